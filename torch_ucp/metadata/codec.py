"""JSON codec of :class:`CheckpointMetadata`, with the format-version check.

The JSON is plain data (no pickle): numbers, strings, lists and objects. Data-object names are
interned in a top-level ``data_objects`` list and fragments refer to them by index, which keeps
metadata of many-rank checkpoints compact.
"""

from __future__ import annotations

import json
import re
from typing import Any

from torch_ucp.errors import UnsupportedFormatError
from torch_ucp.metadata.dtypes import dtype_to_name, name_to_dtype
from torch_ucp.metadata.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointMetadata,
    Fragment,
    MeshInfo,
    ObjectEntry,
    PlacementInfo,
    StoredBytes,
    TensorEntry,
)


def placement_to_json(p: PlacementInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": p.kind}
    if p.dim is not None:
        out["dim"] = p.dim
    if p.split_factor is not None:
        out["split_factor"] = p.split_factor
    return out


def placement_from_json(d: dict[str, Any]) -> PlacementInfo:
    return PlacementInfo(d["kind"], d.get("dim"), d.get("split_factor"))


class _ObjectTable:
    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        idx = self._index.get(name)
        if idx is None:
            idx = self._index[name] = len(self.names)
            self.names.append(name)
        return idx


def _stored_to_json(s: StoredBytes, table: _ObjectTable) -> dict[str, Any]:
    return {
        "object": table(s.object),
        "byte_offset": s.byte_offset,
        "byte_length": s.byte_length,
        "checksums": list(s.checksums),
    }


_SAFE_OBJECT_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def _check_object_name(name: Any) -> str:
    """Data objects must stay inside the checkpoint folder: relative, no ``..``."""
    if (
        not isinstance(name, str)
        or not _SAFE_OBJECT_NAME.match(name)
        or any(part in (".", "..") for part in name.split("/"))
    ):
        raise ValueError(f"data object name {name!r} is not a relative path inside the checkpoint")
    return name


def _nonneg_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _stored_from_json(d: dict[str, Any], names: list[str]) -> StoredBytes:
    index = _nonneg_int(d["object"], "object index")
    if index >= len(names):
        raise ValueError(f"object index {index} out of range ({len(names)} data objects)")
    return StoredBytes(
        names[index],
        _nonneg_int(d["byte_offset"], "byte_offset"),
        _nonneg_int(d["byte_length"], "byte_length"),
        tuple(d.get("checksums", ())),
    )


def _check_fragment(fqn: str, shape: tuple[int, ...], f: Fragment) -> Fragment:
    if len(f.offsets) != len(shape) or len(f.lengths) != len(shape):
        raise ValueError(f"{fqn}: fragment rank does not match shape {list(shape)}")
    for o, n, size in zip(f.offsets, f.lengths, shape):
        if type(o) is not int or type(n) is not int or o < 0 or n < 0 or o + n > size:
            raise ValueError(
                f"{fqn}: fragment at {list(f.offsets)} of {list(f.lengths)} lies outside "
                f"shape {list(shape)}"
            )
    return f


def _checksum_to_json(meta: CheckpointMetadata) -> dict[str, Any]:
    out: dict[str, Any] = {"algorithm": meta.checksum_algorithm, "block_bytes": meta.checksum_block_bytes}
    if meta.checksum_block_width is not None:  # absent: version-1 flat blocks
        out["block_width"] = meta.checksum_block_width
    return out


def metadata_to_dict(meta: CheckpointMetadata) -> dict[str, Any]:
    table = _ObjectTable()
    tensors = {}
    for fqn, t in meta.tensors.items():
        entry: dict[str, Any] = {"dtype": dtype_to_name(t.dtype), "shape": list(t.shape)}
        if t.mesh is not None:
            entry["mesh"] = t.mesh
        if t.placements is not None:
            entry["placements"] = [placement_to_json(p) for p in t.placements]
        frags = []
        for f in t.fragments:
            fd: dict[str, Any] = {"offsets": list(f.offsets), "lengths": list(f.lengths)}
            fd.update(_stored_to_json(f.data, table))
            if f.rank is not None:
                fd["rank"] = f.rank
            if f.coordinate is not None:
                fd["coordinate"] = list(f.coordinate)
            frags.append(fd)
        entry["fragments"] = frags
        tensors[fqn] = entry
    objects = {}
    for fqn, o in meta.objects.items():
        od: dict[str, Any] = {"encoding": o.encoding}
        od.update(_stored_to_json(o.data, table))
        if o.rank is not None:
            od["rank"] = o.rank
        objects[fqn] = od
    return {
        "format": FORMAT_NAME,
        "version": meta.version,
        "save_id": meta.save_id,
        "world_size": meta.world_size,
        "torch_version": meta.torch_version,
        "created": meta.created,
        "checksum": _checksum_to_json(meta),
        "meshes": [
            {"shape": list(m.shape), "dim_names": list(m.dim_names) if m.dim_names else None}
            for m in meta.meshes
        ],
        "patterns": meta.patterns,
        "flatten_mapping": meta.flatten_mapping,
        "data_objects": table.names,
        "tensors": tensors,
        "objects": objects,
    }


def metadata_from_dict(d: dict[str, Any], source: str = "<metadata>") -> CheckpointMetadata:
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{source} is not torch_ucp checkpoint metadata")
    version = d.get("version")
    if type(version) is not int or version < 1 or version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{source} has format version {version!r}; this torch_ucp reads versions "
            f"1..{FORMAT_VERSION}. Upgrade torch_ucp to load it."
        )
    try:
        names: list[str] = [_check_object_name(n) for n in d["data_objects"]]
        tensors = {}
        for fqn, t in d["tensors"].items():
            placements = t.get("placements")
            shape = tuple(_nonneg_int(s, f"{fqn}: shape entry") for s in t["shape"])
            tensors[fqn] = TensorEntry(
                fqn=fqn,
                dtype=name_to_dtype(t["dtype"]),
                shape=shape,
                fragments=[
                    _check_fragment(
                        fqn,
                        shape,
                        Fragment(
                            offsets=tuple(f["offsets"]),
                            lengths=tuple(f["lengths"]),
                            data=_stored_from_json(f, names),
                            rank=f.get("rank"),
                            coordinate=tuple(f["coordinate"]) if "coordinate" in f else None,
                        ),
                    )
                    for f in t["fragments"]
                ],
                mesh=t.get("mesh"),
                placements=(
                    tuple(placement_from_json(p) for p in placements) if placements else None
                ),
            )
        objects = {
            fqn: ObjectEntry(fqn, o["encoding"], _stored_from_json(o, names), o.get("rank"))
            for fqn, o in d["objects"].items()
        }
        meshes = [
            MeshInfo(tuple(m["shape"]), tuple(m["dim_names"]) if m.get("dim_names") else None)
            for m in d["meshes"]
        ]
        return CheckpointMetadata(
            save_id=d["save_id"],
            world_size=d["world_size"],
            tensors=tensors,
            objects=objects,
            meshes=meshes,
            flatten_mapping=d.get("flatten_mapping", {}),
            checksum_algorithm=d["checksum"]["algorithm"],
            checksum_block_bytes=d["checksum"]["block_bytes"],
            checksum_block_width=d["checksum"].get("block_width"),
            patterns=d.get("patterns", []),
            torch_version=d.get("torch_version", ""),
            created=d.get("created", 0.0),
            version=version,
        )
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise UnsupportedFormatError(f"{source}: malformed torch_ucp metadata ({e!r})") from e


def encode_metadata(meta: CheckpointMetadata) -> bytes:
    return json.dumps(metadata_to_dict(meta), separators=(",", ":")).encode()


def decode_metadata(data: bytes, source: str = "<metadata>") -> CheckpointMetadata:
    if data[:1] != b"{":
        hint = ""
        if data[:1] == b"\x80":
            hint = (
                " It looks like a stock torch.distributed.checkpoint (pickled) .metadata: load it"
                " with FileSystemReader and UCPLoadPlanner, or `torch-ucp convert` it."
            )
        raise UnsupportedFormatError(f"{source} is not JSON torch_ucp metadata.{hint}")
    try:
        d = json.loads(data)
    except json.JSONDecodeError as e:
        raise UnsupportedFormatError(f"{source}: metadata is not valid JSON ({e})") from e
    return metadata_from_dict(d, source)
