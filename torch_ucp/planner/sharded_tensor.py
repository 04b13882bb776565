"""ShardedTensor (``torch.distributed._shard``) in both planners: local shards are fragments.

A ShardedTensor - what FSDP1's ``SHARDED_STATE_DICT``, torchrec and older checkpoints hold - is
a list of shards per rank, each an exact box of the logical tensor (``ShardMetadata``'s offsets
and sizes) with its own local tensor. Saving writes each local shard as one fragment; loading
fills each local shard from the fragments its box overlaps, whatever layout (DTensor, plain
tensor, another ShardedTensor) saved them.

The layout is recorded, so that readers can route (docs/FORMAT.md, "Routing") and
``torch-ucp inspect`` can show it, as a 1-D mesh whose rank table is the shards' placement
ranks in shard order with ``Shard(d)``, wherever that describes every shard exactly: a
``ChunkShardingSpec`` over distinct ranks, or an enumerable spec that happens to chunk one dim
the same way (``torch.chunk`` sizes). Any other layout (several shards on one rank, irregular
boxes) is saved with the header's ``writers`` list instead, like a plain tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torch_ucp import _compat
from torch_ucp.errors import LoadPlanError, SavePlanError
from torch_ucp.metadata.placements import Box, boxes_for
from torch_ucp.metadata.schema import MeshInfo, PlacementInfo

SAVED_AS = "sharded_tensor"
"""``TensorEntry.saved_as`` of a tensor saved from ShardedTensors."""


@functools.cache
def _type() -> type:
    return _compat.sharded_tensor_type()


def is_sharded_tensor(obj: Any) -> bool:
    return isinstance(obj, _type())


@dataclass(frozen=True)
class ChunkLayout:
    """A ShardedTensor's layout as a DTensor layout: the mesh (the placement ranks), the
    placements (``Shard(dim)``) and this rank's coordinate (``None``: it holds no shard)."""

    mesh: MeshInfo
    placements: tuple[PlacementInfo, ...]
    coordinate: tuple[int, ...] | None


def dtype_of(st: Any) -> torch.dtype:
    return st.metadata().tensor_properties.dtype


def local_shards(fqn: str, st: Any, *, loading: bool = False) -> list[tuple[Box, torch.Tensor]]:
    """``(box, data)`` of every local shard holding elements: ``box`` is the shard's place in
    the logical tensor (``local_offsets`` are zeros: the box is all of ``data``). A shard that
    contradicts its metadata is a :class:`SavePlanError` (a :class:`LoadPlanError` in a load
    target, ``loading=True``)."""
    error, verb = (LoadPlanError, "load into") if loading else (SavePlanError, "save")
    shape = tuple(st.size())
    out = []
    for shard in st.local_shards():
        md = shard.metadata
        offsets, sizes = tuple(int(o) for o in md.shard_offsets), tuple(int(s) for s in md.shard_sizes)
        data = shard.tensor
        if tuple(data.shape) != sizes:
            raise error(
                f"{fqn}: a local shard of the ShardedTensor at offsets {list(offsets)} has shape "
                f"{tuple(data.shape)}, its metadata says {list(sizes)}"
            )
        if len(offsets) != len(shape) or any(o < 0 or o + n > s for o, n, s in zip(offsets, sizes, shape)):
            raise error(
                f"{fqn}: a local shard at offsets {list(offsets)} of sizes {list(sizes)} lies "
                f"outside the ShardedTensor's shape {list(shape)}"
            )
        if data.device.type == "meta":
            raise error(f"{fqn}: cannot {verb} a ShardedTensor shard on the meta device")
        if math.prod(sizes):
            out.append((Box(offsets, sizes, (0,) * len(sizes)), data))
    return out


def shard_data(st: Any, offsets: Sequence[int]) -> torch.Tensor:
    """The local tensor of the local shard at ``offsets`` (a load's destination)."""
    want = [int(o) for o in offsets]
    for shard in st.local_shards():
        if [int(o) for o in shard.metadata.shard_offsets] == want:
            return shard.tensor
    raise KeyError(f"no local shard at offsets {want}")


def chunk_layout(st: Any) -> ChunkLayout | None:
    """The layout of ``st`` as a 1-D mesh of its placement ranks with ``Shard(d)``, if that
    gives every shard exactly (see the module docstring), else ``None``. Decided from the
    global shard metadata, so every rank decides the same."""
    shards = st.metadata().shards_metadata
    shape = tuple(int(s) for s in st.size())
    if not shards or not shape:
        return None
    ranks = [_compat.sharded_tensor_global_rank(st, s.placement.rank()) for s in shards]
    if len(set(ranks)) != len(ranks):
        return None  # a rank holding several shards is not one mesh position
    dim = _compat.chunk_sharding_dim(st)
    candidates = [dim % len(shape)] if dim is not None else range(len(shape))
    for d in candidates:
        placements = (PlacementInfo("shard", d),)
        if all(_matches(shape, len(shards), placements, j, s) for j, s in enumerate(shards)):
            me = dist.get_rank() if dist.is_initialized() else 0
            coordinate = (ranks.index(me),) if me in ranks else None
            return ChunkLayout(MeshInfo((len(shards),), None, tuple(ranks)), placements, coordinate)
    return None


def _matches(shape: tuple[int, ...], n: int, placements: tuple[PlacementInfo, ...], j: int, shard: Any) -> bool:
    """Whether mesh position ``j`` of ``n`` holds exactly ``shard``'s box under ``placements``."""
    sizes = [int(s) for s in shard.shard_sizes]
    boxes = boxes_for(shape, (n,), placements, (j,))
    if not math.prod(sizes):
        return not boxes
    return len(boxes) == 1 and (
        list(boxes[0].global_offsets) == [int(o) for o in shard.shard_offsets] and list(boxes[0].lengths) == sizes
    )
