"""Reading format version 1: one JSON object listing every fragment (torch_ucp 0.1).

Version 1 put every fragment in ``.metadata`` as a JSON object and data-object names in a
``data_objects`` table; it carries no checksum of its own. It is decoded into the same types as
version 2 (the fragment rows straight into columns). ``torch-ucp convert`` rewrites a
version-1 checkpoint as version 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torch_ucp.metadata.fields import Fields
from torch_ucp.metadata.fragments import FragmentRows
from torch_ucp.metadata.schema import V1_CHECKSUM_BLOCK_BYTES, CheckpointMetadata, TensorEntry


def metadata_from_v1(d: dict[str, Any], source: str) -> tuple[CheckpointMetadata, FragmentRows]:
    f = Fields(source)
    names = [f.object_name(n, "data_objects") for n in f.get(d, "data_objects", "data_objects", list)]
    # version 1 recorded no rank tables: its meshes have ranks=None
    meshes = [f.mesh(m, f"meshes[{i}]") for i, m in enumerate(f.get(d, "meshes", "meshes", list))]
    tensors: dict[str, TensorEntry] = {}
    tensor_col: list[int] = []
    offsets: list[tuple[int, ...]] = []
    lengths: list[tuple[int, ...]] = []
    obj: list[int] = []
    byte_offset: list[int] = []
    byte_length: list[int] = []
    counts: list[int] = []
    checksums: list[int] = []
    rank: list[int] = []
    for t_id, (fqn, t) in enumerate(f.get(d, "tensors", "tensors", dict).items()):
        where = f"tensor {fqn!r}"
        shape = f.ints(f.get(t, "shape", where, list), where + ".shape")
        mesh = f.count(t, "mesh", where, optional=True, upper=len(meshes))
        placements = t.get("placements") if isinstance(t, dict) else None
        frags = f.get(t, "fragments", where, list)
        for frag in frags:
            o = f.ints(f.get(frag, "offsets", where, list), where + ".offsets")
            n = f.ints(f.get(frag, "lengths", where, list), where + ".lengths")
            if len(o) != len(shape) or len(n) != len(shape):
                raise f.fail(where, f"fragment rank does not match shape {list(shape)}")
            k = f.count(frag, "object", where, upper=max(len(names), 1))
            if k >= len(names):
                raise f.fail(where, f"object index {k} out of range ({len(names)} data objects)")
            sums = f.ints(f.get(frag, "checksums", where, list, optional=True) or [], where, upper=2**32)
            tensor_col.append(t_id)
            offsets.append(o)
            lengths.append(n)
            obj.append(k)
            byte_offset.append(f.count(frag, "byte_offset", where))
            byte_length.append(f.count(frag, "byte_length", where))
            counts.append(len(sums))
            checksums.extend(sums)
            rank.append(f.count(frag, "rank", where, optional=True, upper=2**31) or 0)
        tensors[fqn] = TensorEntry(
            fqn=fqn,
            dtype=f.dtype(f.get(t, "dtype", where, str), where),
            shape=shape,
            fragments=len(frags),
            mesh=mesh,
            placements=f.placements(placements, where) if placements else None,
        )
    ndim = max((len(o) for o in offsets), default=0)
    off = np.zeros((len(offsets), ndim), dtype=np.int64)
    lens = np.ones((len(lengths), ndim), dtype=np.int64)
    for i, (o, n) in enumerate(zip(offsets, lengths)):
        off[i, : len(o)] = o
        lens[i, : len(n)] = n
    rows = FragmentRows(
        tensor=np.array(tensor_col, dtype=np.int64),
        offsets=off,
        lengths=lens,
        objects=names,
        object=np.array(obj, dtype=np.int32),
        byte_offset=np.array(byte_offset, dtype=np.int64),
        byte_length=np.array(byte_length, dtype=np.int64),
        checksum_start=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
        checksums=np.array(checksums, dtype=np.uint32),
        rank=np.array(rank, dtype=np.int32),
    )
    values = {
        fqn: f.value(fqn, o, names[_object_index(f, o, fqn, len(names))])
        for fqn, o in f.get(d, "objects", "objects", dict).items()
    }
    checksum = f.get(d, "checksum", "checksum", dict)
    meta = CheckpointMetadata(
        save_id=f.get(d, "save_id", "save_id", str),
        world_size=f.count(d, "world_size", "world_size", upper=2**31),
        tensors=tensors,
        values=values,
        meshes=meshes,
        flatten_mapping=f.flatten_mapping(d.get("flatten_mapping", {})),
        checksum_algorithm=f.get(checksum, "algorithm", "checksum", str),
        checksum_block_bytes=f.count(checksum, "block_bytes", "checksum") or V1_CHECKSUM_BLOCK_BYTES,
        patterns=f.get(d, "patterns", "patterns", list, optional=True) or [],
        torch_version=f.get(d, "torch_version", "torch_version", str, optional=True) or "",
        created=float(f.get(d, "created", "created", (int, float), optional=True) or 0.0),
        version=1,
    )
    return meta, rows


def _object_index(f: Fields, entry: Any, fqn: str, count: int) -> int:
    k = f.count(entry, "object", f"value {fqn!r}", upper=max(count, 1))
    if k >= count:
        raise f.fail(f"value {fqn!r}", f"object index {k} out of range ({count} data objects)")
    return k
