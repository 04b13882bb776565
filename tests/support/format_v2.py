"""An independent reader and writer of format version 2, written from docs/FORMAT.md alone.

Tests use it to check that what torch_ucp writes matches the specification byte for byte (it
shares no code with ``torch_ucp.metadata``), and to forge checkpoints: edit a header or an index
and re-sign it, the way a tool in another language would.
"""

from __future__ import annotations

import json
import os
import struct

import crc32c
import numpy as np

PREFIX = b'{"header_crc32c":"'
HEAD = struct.Struct("<8sIIQIIQQII")


def read_header(path: str) -> dict:
    with open(os.path.join(path, ".metadata"), "rb") as f:
        raw = f.read()
    assert raw.startswith(PREFIX) and raw[26:28] == b'",', raw[:40]
    assert int(raw[18:26], 16) == crc32c.crc32c(raw[28:]), "header checksum"
    return json.loads(raw)


def write_header(path: str, header: dict, *, sign: bool = True) -> None:
    """Write ``header`` (its ``header_crc32c`` recomputed unless ``sign`` is False)."""
    body = {k: v for k, v in header.items() if k != "header_crc32c"}
    rest = json.dumps(body, separators=(",", ":"))[1:].encode()
    crc = crc32c.crc32c(rest) if sign else int(header["header_crc32c"], 16)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b'{"header_crc32c":"%08x",' % crc + rest)


def index_name(header: dict, rank: int) -> str:
    return f"data-{header['save_id']}/{rank:05d}.idx"


def tensor_key(fqn: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(fqn.encode(), digest_size=8).digest(), "little")


def read_index(path: str, header: dict, rank: int) -> dict:
    """Decode ``data-<save_id>/<rank>.idx`` following FORMAT.md; checks its size and crc32c
    against the header."""
    with open(os.path.join(path, index_name(header, rank)), "rb") as f:
        raw = f.read()
    i = header["indexes"]["ranks"].index(rank)
    assert len(raw) == header["indexes"]["bytes"][i]
    assert crc32c.crc32c(raw) == header["indexes"]["crc32c"][i]
    magic, version, writer, n, ndim, width, c, block, m, block_width = HEAD.unpack_from(raw)
    assert (magic, version, writer) == (b"UCPFIDX\x00", 2, rank)
    assert block == header["checksum"]["block_bytes"] and n == header["indexes"]["rows"][i]
    assert block_width == (header["checksum"].get("block_width") or 0)
    pos = HEAD.size
    names = json.loads(raw[pos : pos + m])
    pos += m + (-m % 8)
    out = {"rank": writer, "names": names, "ndim": ndim, "width": width, "block": block, "block_width": block_width}
    coord = "<u8" if width == 8 else "<u4"
    for field, dtype, count in [
        ("tensor_key", "<u8", n), ("object", "<u4", n), ("byte_offset", "<u8", n),
        ("byte_length", "<u8", n), ("checksum_count", "<u4", n), ("offsets", coord, n * ndim),
        ("lengths", coord, n * ndim), ("checksums", "<u4", c),
    ]:
        size = np.dtype(dtype).itemsize * count
        out[field] = np.frombuffer(raw, dtype=dtype, count=count, offset=pos).copy()
        pos += size + (-size % 8)
    assert pos == len(raw)
    out["offsets"] = out["offsets"].reshape(n, ndim)
    out["lengths"] = out["lengths"].reshape(n, ndim)
    return out


def write_index(path: str, header: dict, index: dict) -> None:
    """Write ``index`` (as :func:`read_index` returns it) and record its size, crc32c and rows
    in ``header`` (call :func:`write_header` afterwards)."""
    n = len(index["tensor_key"])
    names = json.dumps(index["names"], separators=(",", ":")).encode()
    coord = "<u8" if index["width"] == 8 else "<u4"
    head = HEAD.pack(b"UCPFIDX\x00", 2, index["rank"], n, index["ndim"], index["width"],
                     len(index["checksums"]), index["block"], len(names), index["block_width"])
    parts = [head, names, bytes(-len(names) % 8)]
    for field, dtype in [("tensor_key", "<u8"), ("object", "<u4"), ("byte_offset", "<u8"),
                         ("byte_length", "<u8"), ("checksum_count", "<u4"), ("offsets", coord),
                         ("lengths", coord), ("checksums", "<u4")]:
        raw = np.ascontiguousarray(index[field], dtype=dtype).tobytes()
        parts += [raw, bytes(-len(raw) % 8)]
    blob = b"".join(parts)
    with open(os.path.join(path, index_name(header, index["rank"])), "wb") as f:
        f.write(blob)
    i = header["indexes"]["ranks"].index(index["rank"])
    header["indexes"]["bytes"][i] = len(blob)
    header["indexes"]["crc32c"][i] = crc32c.crc32c(blob)
    header["indexes"]["rows"][i] = n


def checksum_slices(index: dict) -> list[slice]:
    """Where each row's block checksums are in ``index["checksums"]``."""
    starts = np.concatenate([[0], np.cumsum(index["checksum_count"].astype(np.int64))])
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def drop_row(index: dict, row: int) -> dict:
    """``index`` without row ``row`` (and its checksums)."""
    keep = np.ones(len(index["tensor_key"]), dtype=bool)
    keep[row] = False
    spans = checksum_slices(index)
    sums = np.concatenate([index["checksums"][s] for i, s in enumerate(spans) if keep[i]] or [np.zeros(0, "<u4")])
    out = dict(index)
    for field in ("tensor_key", "object", "byte_offset", "byte_length", "checksum_count", "offsets", "lengths"):
        out[field] = index[field][keep]
    out["checksums"] = sums
    return out


def block_checksums(data: bytes, lengths: list[int], itemsize: int, header: dict) -> list[int]:
    """The block checksums of a fragment's bytes, as FORMAT.md "Checksum block layout" says."""
    block, width = header["checksum"]["block_bytes"], header["checksum"].get("block_width")
    if not data:
        return []
    if width is None or len(lengths) < 2:  # flat blocks
        return [crc32c.crc32c(data[i : i + block]) for i in range(0, len(data), block)]
    row_bytes = lengths[-1] * itemsize
    rows = lengths[-2]
    mats = len(data) // (row_bytes * rows)
    w = min(row_bytes, width)
    h = max(1, block // w)
    out = []
    for m in range(mats):
        for i in range(0, rows, h):
            for j in range(0, row_bytes, w):
                piece = b"".join(
                    data[(m * rows + r) * row_bytes + j : (m * rows + r) * row_bytes + min(j + w, row_bytes)]
                    for r in range(i, min(i + h, rows))
                )
                out.append(crc32c.crc32c(piece))
    return out


def _fmix64(x: int) -> int:
    m = (1 << 64) - 1
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & m
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & m
    return x ^ (x >> 33)


def content_multiplier(i: int) -> int:
    """FORMAT.md "Content hash": the odd multiplier ``R(i)`` of global element index ``i``."""
    m = (1 << 64) - 1
    t = _fmix64(((i % 65536) + 0x9E3779B97F4A7C15) & m) | 1
    u = _fmix64(((i >> 16) + 0xD6E8FEB86659FD93) & m) | 1
    return (t * u) & m


def content_hash(data: bytes, itemsize: int) -> str:
    """FORMAT.md "Content hash" (``mlh64``) of a whole tensor's C-order bytes, element by element."""
    m = (1 << 64) - 1
    word = min(itemsize, 8)
    total = 0
    for i in range(len(data) // word):
        w = int.from_bytes(data[i * word : (i + 1) * word], "little")
        x = w ^ (w >> 32) if word == 8 else w
        total = (total + x * content_multiplier(i)) & m
    return f"{total:016x}"
