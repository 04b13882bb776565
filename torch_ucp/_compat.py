"""Every private PyTorch API torch_ucp relies on, behind one version guard.

torch_ucp is tested on torch 2.13; the names below are private in that release (leading
underscore or an internal module). Keeping them here means a torch upgrade that moves one of
them breaks exactly one file, and the guard below says which release was tested.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict as _flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element as _set_element
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.planner_helpers import (
    _create_write_item_for_bytesio,
    _create_write_items,
)
from torch.distributed.tensor.placement_types import Shard, _StridedShard

TESTED_TORCH = "2.13"
"""The torch release every private API below was checked against."""


def _check_torch_version() -> None:
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if release != TESTED_TORCH:
        warnings.warn(
            f"torch_ucp was tested with torch {TESTED_TORCH}.x and relies on private APIs of it "
            f"(torch_ucp/_compat.py); this is torch {torch.__version__}",
            RuntimeWarning,
            stacklevel=3,
        )


_check_torch_version()

StridedShard = _StridedShard
"""``_StridedShard``: FSDP2 + TP (or EP + FSDP) sharding of one dim over two mesh dims."""


def split_factor(p: _StridedShard) -> int:
    """A ``_StridedShard``'s split factor as a Python int."""
    return int(p._split_factor_int())


def split_indices(p: Shard, indices: torch.Tensor, num_chunks: int) -> list[torch.Tensor]:
    """The pieces of a 1-D index vector that ``p`` (``Shard`` or ``_StridedShard``, any dim)
    gives each of ``num_chunks`` mesh positions, replaying torch's own ``_split_tensor`` so
    that uneven and strided layouts follow torch's semantics exactly."""
    as_dim0 = _StridedShard(0, split_factor=split_factor(p)) if isinstance(p, _StridedShard) else Shard(0)
    pieces, _ = as_dim0._split_tensor(indices, num_chunks, with_padding=False, contiguous=False)
    return list(pieces)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard without autograd bookkeeping (``DTensor._local_tensor``); a
    plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def sharded_tensor_type() -> type:
    """``ShardedTensor`` of ``torch.distributed._shard`` (FSDP1's ``SHARDED_STATE_DICT``,
    torchrec, older checkpoints)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return ShardedTensor


def chunk_sharding_dim(st: torch.Tensor) -> int | None:
    """The sharded dim of a ShardedTensor built from a ``ChunkShardingSpec`` (``None`` for any
    other sharding spec)."""
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = st.sharding_spec()
    return int(spec.dim) if isinstance(spec, ChunkShardingSpec) and isinstance(spec.dim, int) else None


def sharded_tensor_global_rank(st: torch.Tensor, group_rank: int) -> int:
    """The global rank of a ShardedTensor's placement rank (placements name ranks of the
    tensor's own process group, ``ShardedTensor._process_group``)."""
    import torch.distributed as dist

    group = getattr(st, "_process_group", None)
    if group is None or not dist.is_initialized() or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def create_write_items(fqn: str, obj: Any) -> list[WriteItem]:
    """DCP's write items for a tensor-like object it knows how to save (``ShardedTensor``, an
    object with ``__create_write_items__``), exactly as ``DefaultSavePlanner`` makes them."""
    return _create_write_items(fqn, obj)


def create_write_item_for_bytes(fqn: str, obj: Any) -> WriteItem:
    """DCP's ``BYTE_IO`` write item for a non-tensor value."""
    return _create_write_item_for_bytesio(fqn, obj)


def set_element(root: dict[str, Any], path: Any, value: Any) -> None:
    """Put ``value`` into nested ``root`` at DCP's flatten-mapping ``path``."""
    _set_element(root, path, value)


def flatten_state_dict(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's flattening of a nested state dict: ``(flat, mapping)`` with dotted FQNs."""
    return _flatten_state_dict(state)


def open_stock_metadata(reader: Any, rank: int | None = None) -> Any:
    """A binary stream of the ``.metadata`` object a stock ``FileSystemReader`` /
    ``FsspecReader`` reads (``reader._get_metadata_path``, ``reader.fs``)."""
    return reader.fs.create_stream(reader._get_metadata_path(rank), "rb")
