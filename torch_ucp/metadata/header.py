"""The header, ``.metadata``: one JSON object that checksums itself (format version 2).

The header is small and constant in the number of fragments: the tensor table (FQN, dtype,
global shape, mesh, placements, fragment count, routing), the meshes with their rank tables,
patterns, DCP's flatten mapping, the non-tensor values, and one entry per fragment index
(:mod:`torch_ucp.metadata.index`) with its size and crc32c. Its first bytes are always::

    {"header_crc32c":"<8 lowercase hex digits>",

and the crc32c (Castagnoli) of every byte after that prefix is those 8 hex digits, so an edited
or bit-rotted header is detected before any field is used. :func:`decode_metadata` also reads
format version 1 (:mod:`torch_ucp.metadata.v1`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from torch_ucp.errors import CorruptCheckpointError, UnsupportedFormatError
from torch_ucp.metadata import content_hash
from torch_ucp.metadata.checksums import crc32c
from torch_ucp.metadata.dtypes import dtype_to_name
from torch_ucp.metadata.fields import Fields, mesh_to_json, placement_to_json, stored_to_json
from torch_ucp.metadata.fragments import FragmentRows
from torch_ucp.metadata.safe_json import load_json
from torch_ucp.metadata.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    CheckpointMetadata,
    IndexRef,
    TensorEntry,
    index_object_name,
)

_PREFIX = re.compile(rb'\{"header_crc32c":"([0-9a-f]{8})",')
_PREFIX_LEN = len('{"header_crc32c":"00000000",')
DEFAULT_MAX_HEADER_BYTES = 256 << 20


def tensor_to_json(t: TensorEntry) -> dict[str, Any]:
    entry: dict[str, Any] = {"dtype": dtype_to_name(t.dtype), "shape": list(t.shape), "fragments": t.fragments}
    if t.mesh is not None:
        entry["mesh"] = t.mesh
    if t.placements is not None:
        entry["placements"] = [placement_to_json(p) for p in t.placements]
    if t.dim_map is not None:
        entry["dim_map"] = {
            "dim": t.dim_map.dim,
            "physical_size": t.dim_map.physical_size,
            "segments": [[s.physical, s.logical, s.length] for s in t.dim_map.segments],
        }
    if t.writers is not None:
        entry["writers"] = list(t.writers)
    if t.content_hash is not None:
        entry["content_hash"] = content_hash.to_hex(t.content_hash)
    if t.saved_as is not None:
        entry["saved_as"] = t.saved_as
    return entry


def encode_header(meta: CheckpointMetadata) -> bytes:
    """The version-2 ``.metadata`` bytes of ``meta``."""
    body = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "save_id": meta.save_id,
        "world_size": meta.world_size,
        "torch_version": meta.torch_version,
        "created": meta.created,
        "checksum": {
            "algorithm": meta.checksum_algorithm,
            "block_bytes": meta.checksum_block_bytes,
            "block_width": meta.checksum_block_width,
        },
        "routing": {"rotate_min_bytes": meta.rotate_min_bytes},
        "meshes": [mesh_to_json(m) for m in meta.meshes],
        "patterns": meta.patterns,
        "flatten_mapping": meta.flatten_mapping,
        "tensors": {fqn: tensor_to_json(t) for fqn, t in meta.tensors.items()},
        "values": {
            fqn: {"encoding": v.encoding, **stored_to_json(v.data), "rank": v.rank}
            for fqn, v in meta.values.items()
        },
        **(
            {"content_hash": {"algorithm": content_hash.ALGORITHM}}
            if any(t.content_hash is not None for t in meta.tensors.values())
            else {}
        ),
        "indexes": {
            "ranks": [i.rank for i in meta.indexes],
            "bytes": [i.nbytes for i in meta.indexes],
            "crc32c": [i.crc32c for i in meta.indexes],
            "rows": [i.rows for i in meta.indexes],
        },
    }
    rest = json.dumps(body, separators=(",", ":"), allow_nan=False)[1:].encode()
    return f'{{"header_crc32c":"{crc32c(rest):08x}",'.encode() + rest


_V1_MARK = f'"format":"{FORMAT_NAME}"'.encode()  # near the start of a version-1 object


def is_torch_ucp_header(head: bytes) -> bool:
    """Whether ``head``, the first bytes (4 KiB are plenty) of a ``.metadata`` object, starts a
    torch_ucp header of any version: version 2's self-checksum prefix, or a version-1 JSON
    object naming the format. A cheap sniff; :func:`decode_metadata` does the checking."""
    return bool(_PREFIX.match(head)) or (head[:1] == b"{" and _V1_MARK in head)


def decode_metadata(
    data: bytes, source: str = "<metadata>", *, max_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[CheckpointMetadata, FragmentRows | None]:
    """Decode ``.metadata`` of any readable version: ``(metadata, rows)``, where ``rows`` are
    all fragment rows for version 1 (they live in its JSON) and ``None`` for version 2 (they
    live in the indexes)."""
    if data[:1] != b"{":
        hint = ""
        if data[:1] == b"\x80":
            hint = (
                " It looks like a stock torch.distributed.checkpoint (pickled) .metadata: load it"
                " with FileSystemReader and UCPLoadPlanner, or `torch-ucp convert` it."
            )
        raise UnsupportedFormatError(f"{source} is not JSON torch_ucp metadata.{hint}")
    d = load_json(data, source, max_bytes=max_bytes)
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{source} is not torch_ucp checkpoint metadata")
    version = d.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UnsupportedFormatError(
            f"{source} has format version {version!r}; this torch_ucp reads versions "
            f"{READABLE_VERSIONS[0]}..{READABLE_VERSIONS[-1]}. Upgrade torch_ucp to load it."
        )
    if version == 1:
        from torch_ucp.metadata.v1 import metadata_from_v1

        return metadata_from_v1(d, source)
    _check_own_checksum(data, source)
    return _from_v2(d, Fields(source)), None


def _check_own_checksum(data: bytes, source: str) -> None:
    match = _PREFIX.match(data)
    if match is None:
        raise CorruptCheckpointError(
            f"{source} is corrupt: a version-2 header must start with "
            '{"header_crc32c":"<8 hex digits>",'
        )
    expected = int(match.group(1), 16)
    got = crc32c(memoryview(data)[_PREFIX_LEN:])
    if got != expected:
        raise CorruptCheckpointError(
            f"{source} is corrupt: its checksum is {got:08x}, the header says {expected:08x} "
            "(the file was edited or damaged; nothing was loaded)"
        )


def _from_v2(d: dict[str, Any], f: Fields) -> CheckpointMetadata:
    checksum = f.get(d, "checksum", "checksum", dict)
    block = f.count(checksum, "block_bytes", "checksum")
    width = f.count(checksum, "block_width", "checksum", optional=True)
    if block == 0 or width == 0:
        raise f.fail("checksum", "block_bytes and block_width must be positive")
    save_id = f.get(d, "save_id", "save_id", str)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", save_id):
        raise f.fail("save_id", f"{save_id!r:.80} is not a save id")
    world = f.count(d, "world_size", "world_size", upper=2**31)
    meshes = [f.mesh(m, f"meshes[{i}]") for i, m in enumerate(f.get(d, "meshes", "meshes", list))]
    hashing = f.get(d, "content_hash", "content_hash", dict, optional=True)
    known_hash = hashing is not None and hashing.get("algorithm") == content_hash.ALGORITHM
    tensors = {}
    for fqn, t in f.get(d, "tensors", "tensors", dict).items():
        where = f"tensor {fqn!r}"
        shape = f.ints(f.get(t, "shape", where, list), where + ".shape")
        mesh = f.count(t, "mesh", where, optional=True, upper=len(meshes))
        placements = t.get("placements") if isinstance(t, dict) else None
        placements = f.placements(placements, where) if placements is not None else None
        if (mesh is None) != (placements is None) or (
            placements is not None and len(placements) != len(meshes[mesh].shape)
        ):
            raise f.fail(where, "mesh and placements must be given together, one placement per mesh dim")
        dim_map = t.get("dim_map")
        writers = t.get("writers")
        tensors[fqn] = TensorEntry(
            fqn=fqn,
            dtype=f.dtype(f.get(t, "dtype", where, str), where),
            shape=shape,
            fragments=f.count(t, "fragments", where),
            mesh=mesh,
            placements=placements,
            dim_map=f.dim_map(dim_map, where + ".dim_map", shape) if dim_map is not None else None,
            writers=f.ints(writers, where + ".writers", upper=max(world, 1)) if writers is not None else None,
            content_hash=f.hex64(t, "content_hash", where) if known_hash else None,
            saved_as=f.get(t, "saved_as", where, str, optional=True),
        )
    values = {
        fqn: f.value(fqn, v, f.object_name(f.get(v, "object", f"value {fqn!r}", str), f"value {fqn!r}"))
        for fqn, v in f.get(d, "values", "values", dict).items()
    }
    idx = f.get(d, "indexes", "indexes", dict)
    columns = [f.ints(f.get(idx, k, "indexes", list), f"indexes.{k}", upper=2**62) for k in ("ranks", "bytes", "crc32c", "rows")]
    if len({len(c) for c in columns}) != 1:
        raise f.fail("indexes", "ranks, bytes, crc32c and rows must have the same length")
    if any(r >= max(world, 1) for r in columns[0]) or len(set(columns[0])) != len(columns[0]):
        raise f.fail("indexes", "ranks must be distinct ranks of the save")
    indexes = [
        IndexRef(rank, index_object_name(save_id, rank), nbytes, crc, rows)
        for rank, nbytes, crc, rows in zip(*columns)
    ]
    routing = f.get(d, "routing", "routing", dict)
    patterns = f.get(d, "patterns", "patterns", list)
    return CheckpointMetadata(
        save_id=save_id,
        world_size=world,
        tensors=tensors,
        values=values,
        meshes=meshes,
        flatten_mapping=f.flatten_mapping(f.get(d, "flatten_mapping", "flatten_mapping", dict)),
        checksum_algorithm=f.get(checksum, "algorithm", "checksum", str),
        checksum_block_bytes=block,
        checksum_block_width=width,
        patterns=patterns,
        rotate_min_bytes=f.count(routing, "rotate_min_bytes", "routing"),
        indexes=indexes,
        torch_version=f.get(d, "torch_version", "torch_version", str, optional=True) or "",
        created=float(f.get(d, "created", "created", (int, float), optional=True) or 0.0),
        version=2,
    )
