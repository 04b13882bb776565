"""Where a rank's local DTensor data sits in the logical tensor: pure index arithmetic.

For every tensor dimension we replay the placements that shard it, in mesh order, on a vector
of global indices, using each placement's own ``_split_tensor`` (so ``Shard``, uneven shards and
``_StridedShard`` follow exactly torch's semantics). What remains is the sorted-by-local-position
list of global indices the rank holds along that dimension, which we compress into runs::

    global rows 0..9, mesh (dp=2, tp=2), placements (_StridedShard(0, sf=2), Shard(0))
    rank (dp=1, tp=0) holds rows [3, 4]   ->  Run(global_start=3, length=2, local_start=0)

A local tensor is the Cartesian product of its per-dimension runs, i.e. a list of exact boxes.
A layout that gives non-contiguous rows simply yields several boxes: never a wrong one.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

try:  # private in every torch release that has it
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - torch without _StridedShard
    _StridedShard = None  # type: ignore[assignment,misc]

from torch_ucp.metadata.schema import MeshInfo, PlacementInfo


@dataclass(frozen=True)
class Run:
    """A contiguous stretch of global indices along one dimension held locally."""

    global_start: int
    length: int
    local_start: int


@dataclass(frozen=True)
class Box:
    """A box of the logical tensor and where it sits in the local tensor."""

    global_offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    local_offsets: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)


def _runs_from_indices(idx: torch.Tensor) -> tuple[Run, ...]:
    n = idx.numel()
    if n == 0:
        return ()
    breaks = ((idx[1:] - idx[:-1]) != 1).nonzero().flatten().add_(1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, n]
    values = idx.tolist() if len(starts) > 1 else [int(idx[0])]
    return tuple(Run(values[s], e - s, s) for s, e in zip(starts, ends))


_SHARD_TYPES: tuple[type, ...] = (Shard,) if _StridedShard is None else (Shard, _StridedShard)


def is_shard(p: Placement) -> bool:
    """Shard or _StridedShard (not a Shard subclass in every torch release)."""
    return isinstance(p, _SHARD_TYPES)


def _as_dim0(p: Placement) -> Placement:
    if _StridedShard is not None and isinstance(p, _StridedShard):
        return _StridedShard(0, split_factor=p._split_factor_int())
    return Shard(0)


@functools.lru_cache(maxsize=65536)
def dim_runs(
    size: int,
    dim: int,
    mesh_shape: tuple[int, ...],
    placements: tuple[Placement, ...],
    coordinate: tuple[int, ...],
) -> tuple[Run, ...]:
    """Runs of global indices that ``coordinate`` holds along tensor dimension ``dim``."""
    idx = torch.arange(size, dtype=torch.int64)
    for mesh_dim, p in enumerate(placements):
        if is_shard(p) and p.dim == dim:
            shards, _ = _as_dim0(p)._split_tensor(
                idx, mesh_shape[mesh_dim], with_padding=False, contiguous=False
            )
            idx = shards[coordinate[mesh_dim]]
    return _runs_from_indices(idx)


def normalize_placements(placements: Sequence[Placement], ndim: int) -> tuple[Placement, ...]:
    """Make shard dims non-negative; reject placements a checkpoint cannot describe."""
    out: list[Placement] = []
    for p in placements:
        if isinstance(p, Partial):
            raise ValueError(
                "a DTensor with a Partial placement holds unreduced values; reduce it "
                "(redistribute to Replicate/Shard) before checkpointing"
            )
        if is_shard(p) and p.dim < 0:
            if _StridedShard is not None and isinstance(p, _StridedShard):
                p = _StridedShard(p.dim + ndim, split_factor=p._split_factor_int())
            else:
                p = Shard(p.dim + ndim)
        out.append(p)
    return tuple(out)


def boxes_for(
    shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[Placement],
    coordinate: Sequence[int],
) -> list[Box]:
    """Exact boxes of the logical tensor held at ``coordinate`` (empty if it holds nothing)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return [Box((), (), ())]
    placements = normalize_placements(placements, len(shape))
    per_dim = [
        dim_runs(size, d, tuple(mesh_shape), placements, tuple(coordinate))
        for d, size in enumerate(shape)
    ]
    if math.prod(shape) == 0:
        return []
    return [
        Box(
            tuple(r.global_start for r in combo),
            tuple(r.length for r in combo),
            tuple(r.local_start for r in combo),
        )
        for combo in itertools.product(*per_dim)
    ]


def whole_box(shape: Sequence[int]) -> Box:
    zeros = (0,) * len(shape)
    return Box(zeros, tuple(int(s) for s in shape), zeros)


def dtensor_boxes(fqn: str, t: DTensor) -> list[Box]:
    """Boxes of ``t``'s local tensor on this rank, checked against the real local shape."""
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the mesh
        return []
    boxes = boxes_for(t.shape, mesh.shape, t.placements, coordinate)
    local = t._local_tensor
    if math.prod(local.shape) != sum(b.numel for b in boxes):
        raise ValueError(
            f"{fqn}: cannot describe DTensor local shard exactly: placements "
            f"{t.placements} on mesh {tuple(mesh.shape)} at {tuple(coordinate)} imply "
            f"{sum(b.numel for b in boxes)} elements, local tensor has shape {tuple(local.shape)}"
        )
    return boxes


def tensor_boxes(fqn: str, t: torch.Tensor) -> list[Box]:
    """Boxes a target or source tensor holds: exact DTensor boxes, or the whole plain tensor."""
    if isinstance(t, DTensor):
        return dtensor_boxes(fqn, t)
    if t.numel() == 0:
        return []
    return [whole_box(t.shape)]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def placement_info(p: Placement) -> PlacementInfo:
    if _StridedShard is not None and isinstance(p, _StridedShard):
        return PlacementInfo("strided_shard", p.dim, p._split_factor_int())
    if isinstance(p, Shard):
        return PlacementInfo("shard", p.dim)
    if isinstance(p, Replicate):
        return PlacementInfo("replicate")
    if isinstance(p, Partial):
        return PlacementInfo("partial")
    return PlacementInfo(type(p).__name__)


def mesh_info(t: DTensor) -> MeshInfo:
    mesh = t.device_mesh
    names = mesh.mesh_dim_names
    return MeshInfo(tuple(mesh.shape), tuple(names) if names else None)
