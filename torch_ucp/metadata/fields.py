"""Typed access to decoded JSON metadata: every field checked, every failure naming the file.

Shared by the header codecs of every format version, so that a wrong type, a missing field or a
negative size anywhere is one :class:`~torch_ucp.errors.UnsupportedFormatError` saying where.
"""

from __future__ import annotations

from typing import Any

from torch_ucp.errors import UnsupportedFormatError
from torch_ucp.metadata.dtypes import name_to_dtype
from torch_ucp.metadata.names import check_object_name
from torch_ucp.metadata.schema import (
    DimMap,
    MeshInfo,
    PlacementInfo,
    Segment,
    StoredBytes,
    ValueEntry,
)

_PLACEMENT_KINDS = ("shard", "strided_shard", "replicate", "partial")


class Fields:
    """Reads fields of ``source``'s metadata, raising ``UnsupportedFormatError`` on bad ones."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> UnsupportedFormatError:
        return UnsupportedFormatError(f"{self.source}: malformed torch_ucp metadata: {where}: {what}")

    def get(self, d: Any, key: str, where: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if not isinstance(d, dict):
            raise self.fail(where, f"expected an object, got {type(d).__name__}")
        if key not in d or d[key] is None:
            if optional:
                return None
            raise self.fail(where, f"missing field {key!r}")
        value = d[key]
        if kind is int and (type(value) is not int):
            raise self.fail(where, f"{key!r} must be an integer, got {value!r:.80}")
        if not isinstance(value, kind):
            raise self.fail(where, f"{key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def count(self, d: Any, key: str, where: str, *, optional: bool = False, upper: int = 2**62) -> int | None:
        value = self.get(d, key, where, int, optional=optional)
        if value is not None and not 0 <= value < upper:
            raise self.fail(where, f"{key!r} must be in [0, {upper}), got {value}")
        return value

    def hex64(self, d: Any, key: str, where: str) -> int | None:
        """An optional 64-bit value written as 16 lowercase hex digits."""
        value = self.get(d, key, where, str, optional=True)
        if value is None:
            return None
        if len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
            raise self.fail(where, f"{key!r} must be 16 lowercase hex digits, got {value!r:.80}")
        return int(value, 16)

    def ints(self, value: Any, where: str, *, upper: int = 2**62, lower: int = 0) -> tuple[int, ...]:
        if not isinstance(value, list) or any(type(v) is not int or not lower <= v < upper for v in value):
            raise self.fail(where, f"expected a list of integers in [{lower}, {upper}), got {value!r:.80}")
        return tuple(value)

    def dtype(self, name: Any, where: str):
        try:
            return name_to_dtype(name)
        except ValueError as e:
            raise self.fail(where, str(e)) from None

    def object_name(self, name: Any, where: str) -> str:
        try:
            return check_object_name(name)
        except ValueError as e:
            raise self.fail(where, str(e)) from None

    def placements(self, value: Any, where: str) -> tuple[PlacementInfo, ...]:
        if not isinstance(value, list):
            raise self.fail(where, "placements must be a list")
        out = []
        for p in value:
            kind = self.get(p, "kind", where, str)
            if kind not in _PLACEMENT_KINDS:
                raise self.fail(where, f"unknown placement kind {kind!r}")
            dim = self.get(p, "dim", where, int, optional=kind not in ("shard", "strided_shard"))
            split = self.get(p, "split_factor", where, int, optional=kind != "strided_shard")
            if split is not None and split < 1:
                raise self.fail(where, f"split_factor {split}")
            out.append(PlacementInfo(kind, dim, split))
        return tuple(out)

    def mesh(self, d: Any, where: str) -> MeshInfo:
        shape = self.ints(self.get(d, "shape", where, list), where + ".shape", upper=2**31)
        names = self.get(d, "dim_names", where, list, optional=True)
        if names is not None and (len(names) != len(shape) or not all(isinstance(n, str) for n in names)):
            raise self.fail(where, f"dim_names {names!r:.80} do not match shape {list(shape)}")
        ranks = d.get("ranks") if isinstance(d, dict) else None
        size = 1
        for s in shape:
            size *= s
        if isinstance(ranks, dict):
            start = self.count(ranks, "start", where + ".ranks", upper=2**31)
            ranks = tuple(range(start, start + size))
        elif ranks is not None:
            ranks = self.ints(ranks, where + ".ranks", upper=2**31)
            if len(ranks) != size:
                raise self.fail(where, f"{len(ranks)} ranks for a mesh of {size}")
        return MeshInfo(shape, tuple(names) if names else None, ranks)

    def dim_map(self, d: Any, where: str, shape: tuple[int, ...]) -> DimMap:
        dim = self.count(d, "dim", where, upper=len(shape))
        physical = self.count(d, "physical_size", where)
        segments = []
        for seg in self.get(d, "segments", where, list):
            p, logical, n = self.ints(seg, where + ".segments")
            if p + n > physical or logical + n > shape[dim]:
                raise self.fail(where, f"segment {seg} outside the dim (physical {physical}, logical {shape[dim]})")
            segments.append(Segment(p, logical, n))
        return DimMap(dim, physical, shape[dim], tuple(segments))

    def stored(self, d: Any, where: str, name: str) -> StoredBytes:
        return StoredBytes(
            name,
            self.count(d, "byte_offset", where),
            self.count(d, "byte_length", where),
            self.ints(self.get(d, "checksums", where, list, optional=True) or [], where + ".checksums", upper=2**32),
        )

    def value(self, fqn: str, d: Any, name: str) -> ValueEntry:
        where = f"value {fqn!r}"
        return ValueEntry(
            fqn,
            self.get(d, "encoding", where, str),
            self.stored(d, where, name),
            self.count(d, "rank", where, optional=True, upper=2**31),
        )

    def flatten_mapping(self, value: Any) -> dict[str, list[Any]]:
        if not isinstance(value, dict):
            raise self.fail("flatten_mapping", "must be an object")
        for key, path in value.items():
            if not isinstance(path, list) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
                raise self.fail("flatten_mapping", f"{key!r}: path must be a list of strings and ints")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def placement_to_json(p: PlacementInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": p.kind}
    if p.dim is not None:
        out["dim"] = p.dim
    if p.split_factor is not None:
        out["split_factor"] = p.split_factor
    return out


def mesh_to_json(m: MeshInfo, *, ranks: bool = True) -> dict[str, Any]:
    """A mesh as the format stores it (docs/FORMAT.md); ``ranks=False`` leaves the rank
    assignment out (a layout shown to people: ``torch-ucp inspect``)."""
    out: dict[str, Any] = {"shape": list(m.shape), "dim_names": list(m.dim_names) if m.dim_names else None}
    if ranks and m.ranks is not None:
        start = m.ranks[0] if m.ranks else 0
        contiguous = all(r == start + i for i, r in enumerate(m.ranks))
        out["ranks"] = {"start": start} if contiguous else list(m.ranks)
    return out


def stored_to_json(s: StoredBytes) -> dict[str, Any]:
    return {
        "object": s.object,
        "byte_offset": s.byte_offset,
        "byte_length": s.byte_length,
        "checksums": list(s.checksums),
    }
