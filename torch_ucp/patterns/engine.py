"""Which pattern applies to which key, with strict checks, and the boxes it maps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["PatternError", "PatternSet", "as_patterns", "dim_map_for", "logical_shape", "map_box"]

from torch_ucp.errors import PatternError
from torch_ucp.metadata.placements import SHARD_KINDS, Box, placement_info
from torch_ucp.patterns.base import DimMap, Pattern
from torch_ucp.patterns.fused import FusedParam
from torch_ucp.patterns.padded import PaddedParam
from torch_ucp.patterns.rename import Rename
from torch_ucp.patterns.stacked import StackedParam


def as_patterns(items: Iterable[Pattern | dict[str, Any]] | None) -> list[Pattern]:
    return [p if isinstance(p, Pattern) else Pattern.from_json(p) for p in items or ()]


class PatternSet:
    """A list of patterns applied to the keys of one state dict (or one checkpoint).

    Strict by default: :meth:`check_used` raises for a pattern that matched nothing, and a key
    claimed by two dim patterns raises at once.
    """

    def __init__(self, patterns: Iterable[Pattern | dict[str, Any]] | None, *, strict: bool = True):
        self.patterns = as_patterns(patterns)
        self.strict = strict
        self.renames = [p for p in self.patterns if isinstance(p, Rename)]
        self.dims = [p for p in self.patterns if isinstance(p, (FusedParam, PaddedParam))]
        self.stacks = [p for p in self.patterns if isinstance(p, StackedParam)]
        self._used: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def _use(self, p: Pattern) -> None:
        self._used.add(id(p))

    def rename(self, key: str) -> str:
        for p in self.renames:
            if p.matches(key):
                self._use(p)
                key = p.apply(key)
        return key

    def dim_pattern(self, key: str) -> FusedParam | PaddedParam | None:
        hits = [p for p in self.dims if p._regex.match(key)]
        if len(hits) > 1:
            raise PatternError(f"{key}: claimed by several patterns: {hits}")
        if hits:
            self._use(hits[0])
            return hits[0]
        return None

    def stacked_item(self, key: str) -> tuple[StackedParam, str, int] | None:
        for p in self.stacks:
            hit = p.match_item(key)
            if hit is not None:
                return p, hit[0], hit[1]
        return None

    def stacked(self, key: str) -> StackedParam | None:
        for p in self.stacks:
            if p.match_stacked(key):
                return p
        return None

    def note_stacked(self, key: str) -> None:
        """Mark the stacked patterns ``key`` has a form of (stacked or per-item) as used: they
        describe the key even where it loads as is (same form on both sides) or is only saved."""
        for p in self.stacks:
            if p.match_stacked(key) or p.match_item(key) is not None:
                self._use(p)

    def mark_used(self, p: Pattern) -> None:
        self._use(p)

    def check_used(self, where: str) -> None:
        if not self.strict:
            return
        unused = [p for p in self.patterns if id(p) not in self._used]
        if unused:
            raise PatternError(f"patterns matched nothing in {where}: {unused}")

    def to_json(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.patterns]


def interleave_degree(p: FusedParam, t: torch.Tensor) -> int:
    """The interleave degree of a fused tensor: its shard count over ``p.mesh_dim``; for a
    tensor without a mesh (plain, or a stock checkpoint's metadata) ``p.degree`` or 1."""
    if not isinstance(t, DTensor):
        return p.degree if p.degree is not None else 1
    names = t.device_mesh.mesh_dim_names or ()
    if p.mesh_dim not in names:
        return 1
    i = names.index(p.mesh_dim)
    placement = t.placements[i]
    info = placement_info(placement)
    if info.kind in SHARD_KINDS and info.dim % t.ndim == p.dim % t.ndim:
        return t.device_mesh.size(i)
    return 1


def dim_map_for(p: FusedParam | PaddedParam | None, fqn: str, t: Any, shape: Sequence[int]) -> DimMap | None:
    """The pattern's index map for tensor ``t`` (``None`` where it does not apply, e.g. a
    0-dim optimizer ``step``)."""
    if p is None or len(shape) <= p.dim:
        return None
    degree = interleave_degree(p, t) if isinstance(p, FusedParam) else 1
    try:
        return p.dim_map(fqn, shape, degree)
    except ValueError as e:
        raise PatternError(str(e)) from None


def logical_shape(shape: Sequence[int], dmap: DimMap | None) -> tuple[int, ...]:
    shape = tuple(shape)
    if dmap is None:
        return shape
    return shape[: dmap.dim] + (dmap.logical_size,) + shape[dmap.dim + 1 :]


def map_box(box: Box, dmap: DimMap | None) -> tuple[list[Box], list[tuple[int, int]]]:
    """Physical box -> logical boxes (local offsets kept), plus the local ranges along the
    mapped dim that hold padding (no logical index)."""
    if dmap is None:
        return [box], []
    d = dmap.dim
    start, length = box.global_offsets[d], box.lengths[d]
    out = []
    covered = 0
    for logical, n, physical in dmap.to_logical(start, length):
        local = box.local_offsets[d] + physical - start
        out.append(
            Box(
                box.global_offsets[:d] + (logical,) + box.global_offsets[d + 1 :],
                box.lengths[:d] + (n,) + box.lengths[d + 1 :],
                box.local_offsets[:d] + (local,) + box.local_offsets[d + 1 :],
            )
        )
        covered += n
    padding = []
    if covered < length:
        hits = sorted((physical, n) for _, n, physical in dmap.to_logical(start, length))
        cursor = start
        for physical, n in hits + [(start + length, 0)]:
            if physical > cursor:
                padding.append((box.local_offsets[d] + cursor - start, physical - cursor))
            cursor = max(cursor, physical + n)
    return out, padding
