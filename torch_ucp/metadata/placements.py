"""What a DTensor placement means for the logical tensor: pure index arithmetic.

For every tensor dimension we replay the placements that shard it, in mesh order, on a vector
of global indices, using torch's own split of each placement (so ``Shard``, uneven shards and
``_StridedShard`` follow torch's semantics exactly). What remains is the sorted-by-local-position
list of global indices a mesh coordinate holds along that dimension, compressed into runs::

    global rows 0..9, mesh (dp=2, tp=2), placements (_StridedShard(0, sf=2), Shard(0))
    coordinate (dp=1, tp=0) holds rows [3, 4]   ->  Run(global_start=3, length=2, local_start=0)

A coordinate's local tensor is the Cartesian product of its per-dimension runs: a list of exact
boxes. A layout that gives non-contiguous rows yields several boxes, never a wrong one.

The same replay tells, for every global index along a dimension, which coordinate of the
sharding mesh dimensions holds it (:func:`dim_owners`): loading uses it to find which writers
hold a box without listing every fragment.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

from torch_ucp import _compat
from torch_ucp.metadata.schema import MeshInfo, PlacementInfo

SHARD_KINDS = ("shard", "strided_shard")


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


def whole_box(shape: Sequence[int]) -> Box:
    zeros = (0,) * len(shape)
    return Box(zeros, tuple(int(s) for s in shape), zeros)


def narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """View of ``t`` restricted to the box ``offsets``/``lengths``."""
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


def normalize_placements(placements: Sequence[PlacementInfo], ndim: int) -> tuple[PlacementInfo, ...]:
    """Make shard dims non-negative; reject placements a checkpoint cannot describe."""
    out = []
    for p in placements:
        if p.kind == "partial":
            raise ValueError(
                "a DTensor with a Partial placement holds unreduced values; reduce it "
                "(redistribute to Replicate/Shard) before checkpointing"
            )
        if p.kind in SHARD_KINDS:
            if p.dim is None or not -ndim <= p.dim < max(ndim, 1):
                raise ValueError(f"placement {p} does not fit a tensor of {ndim} dims")
            if p.dim < 0:
                p = PlacementInfo(p.kind, p.dim + ndim, p.split_factor)
        elif p.kind != "replicate":
            raise ValueError(f"placement kind {p.kind!r} is not supported")
        out.append(p)
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def _torch_placement(p: PlacementInfo) -> Shard:
    if p.kind == "strided_shard":
        return _compat.StridedShard(0, split_factor=p.split_factor or 1)
    return Shard(0)


def _split(p: PlacementInfo, indices: torch.Tensor, n: int) -> list[torch.Tensor]:
    return _compat.split_indices(_torch_placement(p), indices, n)


def _runs_from_indices(idx: torch.Tensor) -> tuple[Run, ...]:
    n = idx.numel()
    if n == 0:
        return ()
    breaks = ((idx[1:] - idx[:-1]) != 1).nonzero().flatten().add_(1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, n]
    values = idx.tolist() if len(starts) > 1 else [int(idx[0])]
    return tuple(Run(values[s], e - s, s) for s, e in zip(starts, ends))


@functools.lru_cache(maxsize=65536)
def dim_runs(
    size: int,
    dim: int,
    mesh_shape: tuple[int, ...],
    placements: tuple[PlacementInfo, ...],
    coordinate: tuple[int, ...],
) -> tuple[Run, ...]:
    """Runs of global indices that ``coordinate`` holds along tensor dimension ``dim``
    (``placements`` normalized)."""
    idx = torch.arange(size, dtype=torch.int64)
    for mesh_dim, p in enumerate(placements):
        if p.kind in SHARD_KINDS and p.dim == dim:
            idx = _split(p, idx, mesh_shape[mesh_dim])[coordinate[mesh_dim]]
    return _runs_from_indices(idx)


def boxes_for(
    shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[PlacementInfo],
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


def sharding_mesh_dims(placements: Sequence[PlacementInfo], dim: int) -> tuple[int, ...]:
    """The mesh dimensions whose placement shards tensor dimension ``dim``, in mesh order."""
    return tuple(m for m, p in enumerate(placements) if p.kind in SHARD_KINDS and p.dim == dim)


@functools.lru_cache(maxsize=4096)
def dim_owners(
    size: int, dim: int, mesh_shape: tuple[int, ...], placements: tuple[PlacementInfo, ...]
) -> np.ndarray:
    """For every global index along ``dim``, which coordinate of the mesh dimensions sharding
    ``dim`` holds it, as the C-order linear index over those mesh dimensions (all zeros when
    nothing shards ``dim``). Read-only; cached per layout."""
    dims = sharding_mesh_dims(placements, dim)
    if all(placements[m].kind == "shard" for m in dims):
        owner = _shard_owners(size, [mesh_shape[m] for m in dims])
    else:
        owner = np.zeros(size, dtype=np.int64)
        groups = [torch.arange(size, dtype=torch.int64)]
        for m in dims:
            n = mesh_shape[m]
            next_groups = []
            for g in groups:
                for j, piece in enumerate(_split(placements[m], g, n)):
                    owner[piece.numpy()] = owner[piece.numpy()] * n + j
                    next_groups.append(piece)
            groups = next_groups
    owner.setflags(write=False)
    return owner


def _shard_owners(size: int, splits: list[int]) -> np.ndarray:
    """``dim_owners`` for nested plain ``Shard`` placements, vectorized: each level cuts every
    contiguous group like ``torch.chunk`` (pieces of ``ceil(len / n)``, empty ones last)."""
    idx = np.arange(size, dtype=np.int64)
    owner = np.zeros(size, dtype=np.int64)
    start = np.zeros(size, dtype=np.int64)
    length = np.full(size, size, dtype=np.int64)
    for n in splits:
        chunk = -(-length // n)
        piece = (idx - start) // np.maximum(chunk, 1)
        owner = owner * n + piece
        start = start + piece * chunk
        length = np.minimum(chunk, length - piece * chunk)
    return owner


# -- from torch objects to the format's types --------------------------------------------------
@functools.lru_cache(maxsize=4096)
def placement_info(p: Placement) -> PlacementInfo:
    """The format's description of a torch placement."""
    if isinstance(p, _compat.StridedShard):
        return PlacementInfo("strided_shard", p.dim, _compat.split_factor(p))
    if isinstance(p, Shard):
        return PlacementInfo("shard", p.dim)
    if isinstance(p, Replicate):
        return PlacementInfo("replicate")
    if isinstance(p, Partial):
        return PlacementInfo("partial")
    return PlacementInfo(type(p).__name__)


def mesh_info(mesh: DeviceMesh) -> MeshInfo:
    """The format's description of a DeviceMesh: shape, dim names and rank table."""
    names = mesh.mesh_dim_names
    return MeshInfo(
        tuple(mesh.shape), tuple(names) if names else None, tuple(mesh.mesh.reshape(-1).tolist())
    )
