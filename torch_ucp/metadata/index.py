"""The fragment index of one writer rank: a binary, columnar, little-endian object.

Each rank of a save writes one index listing the fragments it wrote, next to its data objects
(``data-<save_id>/<rank:05d>.idx``). The header lists every index with its size and crc32c, so
an index is verified before it is decoded and a loading rank fetches only the indexes its
target overlaps. docs/FORMAT.md specifies the layout byte for byte::

    offset  size  field
         0     8  magic  b"UCPFIDX\\0"
         8     4  u32    format version (2)
        12     4  u32    writer rank
        16     8  u64    rows (n)
        24     4  u32    ndim: width of the offsets / lengths rows
        28     4  u32    width in bytes of one offsets / lengths entry (4 or 8)
        32     8  u64    checksums (c): total block checksums
        40     8  u64    checksum block bytes (the header's block_bytes)
        48     4  u32    names length (m): bytes of the UTF-8 JSON array of object names
        52     4  u32    checksum block width (the header's block_width; 0: flat blocks)
        56     m         object names, then zero bytes to a multiple of 8
    then, each zero-padded to a multiple of 8 bytes:
        tensor_key     u64[n]       blake2b-64 of the tensor's FQN (see fragments.tensor_key)
        object         u32[n]       index into the object names
        byte_offset    u64[n]
        byte_length    u64[n]
        checksum_count u32[n]       block checksums of each row
        offsets        uW[n*ndim]   row-major, W = the entry width; 0 beyond a tensor's dims
        lengths        uW[n*ndim]   1 beyond a tensor's dims
        checksums      u32[c]       every row's block checksums, in row order

The object's length is exactly the end of the last column.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.metadata.fragments import FragmentRows
from torch_ucp.metadata.names import check_object_name

MAGIC = b"UCPFIDX\x00"
INDEX_VERSION = 2
_HEAD = struct.Struct("<8sIIQIIQQII")
MAX_NDIM = 64


def _pad8(n: int) -> int:
    return -n % 8


def encode_index(
    rank: int,
    tensor_keys: np.ndarray,
    rows: FragmentRows,
    block_bytes: int,
    block_width: int | None,
) -> bytes:
    """The index object of writer ``rank``: ``rows`` (their ``tensor`` column ignored) named by
    ``tensor_keys`` (one u64 per row), with checksums in blocks of ``block_bytes`` /
    ``block_width`` (:class:`~torch_ucp.metadata.checksums.BlockGrid`)."""
    n = len(rows)
    ndim = rows.ndim
    counts = np.diff(rows.checksum_start)
    if int(counts.sum()) != len(rows.checksums):
        raise ValueError("the rows' checksum counts do not add up to their checksums")
    big = n and (int(rows.offsets.max(initial=0)) >= 2**32 or int(rows.lengths.max(initial=0)) >= 2**32)
    width = 8 if big else 4
    coord = "<u8" if width == 8 else "<u4"
    names = json.dumps(list(rows.objects), separators=(",", ":")).encode()
    head = _HEAD.pack(
        MAGIC, INDEX_VERSION, rank, n, ndim, width, len(rows.checksums), block_bytes, len(names), block_width or 0
    )
    parts = [head, names, bytes(_pad8(len(names)))]
    for column in (
        np.asarray(tensor_keys, dtype="<u8"),
        rows.object.astype("<u4"),
        rows.byte_offset.astype("<u8"),
        rows.byte_length.astype("<u8"),
        counts.astype("<u4"),
        rows.offsets.astype(coord),
        rows.lengths.astype(coord),
        rows.checksums.astype("<u4"),
    ):
        raw = column.tobytes()
        parts += [raw, bytes(_pad8(len(raw)))]
    return b"".join(parts)


def decode_index(
    data: bytes | memoryview, source: str
) -> tuple[int, np.ndarray, FragmentRows, tuple[int, int | None]]:
    """``(writer rank, tensor keys, rows, (block_bytes, block_width))`` of an index object;
    ``source`` names it in errors. Every length is checked against the object's size before
    anything is allocated."""

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"fragment index {source} is corrupt: {what}")

    data = memoryview(data)
    if len(data) < _HEAD.size:
        raise bad(f"{len(data)} bytes, shorter than its {_HEAD.size}-byte header")
    magic, version, rank, n, ndim, width, c, block, m, block_width = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise bad(f"bad magic {bytes(magic)!r}")
    if version != INDEX_VERSION:
        raise bad(f"index version {version}, this torch_ucp reads {INDEX_VERSION}")
    if width not in (4, 8) or ndim > MAX_NDIM or block <= 0:
        raise bad(f"ndim {ndim}, entry width {width}, checksum block {block}")
    pos = _HEAD.size
    sizes = [m + _pad8(m)]
    for item, count in ((8, n), (4, n), (8, n), (8, n), (4, n), (width, n * ndim), (width, n * ndim), (4, c)):
        sizes.append(item * count + _pad8(item * count))
    if pos + sum(sizes) != len(data):
        raise bad(f"{len(data)} bytes, its header describes {pos + sum(sizes)}")
    try:
        names = json.loads(bytes(data[pos : pos + m]).decode("utf-8"))
        if not isinstance(names, list):
            raise TypeError("not a list")
        objects = [check_object_name(name) for name in names]
    except (ValueError, TypeError) as e:
        raise bad(f"object names: {e}") from None
    pos += sizes[0]

    def column(dtype: str, count: int, k: int) -> np.ndarray:
        nonlocal pos
        out = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos += sizes[k]
        return out

    coord = "<u8" if width == 8 else "<u4"
    keys = column("<u8", n, 1)
    obj = column("<u4", n, 2)
    byte_offset = column("<u8", n, 3)
    byte_length = column("<u8", n, 4)
    counts = column("<u4", n, 5).astype(np.int64)
    offsets = column(coord, n * ndim, 6).reshape(n, ndim)
    lengths = column(coord, n * ndim, 7).reshape(n, ndim)
    checksums = column("<u4", c, 8)
    if n and int(obj.max()) >= len(objects):
        raise bad(f"a row names object {int(obj.max())} of {len(objects)}")
    if n and (int(byte_offset.max()) >= 2**62 or int(byte_length.max()) >= 2**62):
        raise bad("a byte offset or length beyond 2**62")
    if int(counts.sum()) != c:
        raise bad(f"{c} checksums, its rows count {int(counts.sum())}")
    rows = FragmentRows(
        tensor=np.zeros(n, dtype=np.int64),
        offsets=offsets.astype(np.int64),
        lengths=lengths.astype(np.int64),
        objects=objects,
        object=obj.astype(np.int32),
        byte_offset=byte_offset.astype(np.int64),
        byte_length=byte_length.astype(np.int64),
        checksum_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        checksums=checksums.astype(np.uint32),
        rank=np.full(n, rank, dtype=np.int32),
    )
    return rank, keys.astype(np.uint64), rows, (block, block_width or None)
