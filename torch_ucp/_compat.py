"""Every private PyTorch API torch_ucp relies on, behind one version guard.

torch_ucp is tested on torch 2.13; the names below are private in that release (leading
underscore or an internal module). Keeping them here means a torch upgrade that moves one of
them breaks exactly one file, and the guard below says which release was tested.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
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
def fsspec_dcp_reader(url: str, storage_options: Mapping[str, Any]) -> Any:
    """Stock DCP's ``FsspecReader`` for ``url`` (its module, ``_fsspec_filesystem``, is private)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **storage_options)


_DATA_RECORD = re.compile(r"(.*/)?data/\d+")  # a storage's record in a torch.save zip file


def save_skeleton(
    path: str, tensors: Mapping[str, tuple[Sequence[int], torch.dtype]], values: Mapping[str, Any]
) -> dict[str, int] | None:
    """``torch.save`` the flat dict ``{**tensors, **values}`` to ``path`` with every tensor's
    record laid out but not written, and return where each tensor's bytes go in the file.

    ``tensors`` maps names to ``(shape, dtype)``; nothing of that size is allocated (the
    tensors are fake, and ``skip_data`` writes no storage bytes). Writing each tensor's
    contiguous bytes at its offset then makes ``path`` the file ``torch.save`` would have
    written, one tensor at a time. Returns ``None`` when the file's records are not exactly
    those tensors (a value holds tensors of its own): the file is then not filled that way.

    Private APIs: ``FakeTensorMode`` and ``torch._C.PyTorchFileReader`` (record offsets). The
    offsets come from ``torch.load(mmap=True)``, which maps the file once and makes every
    storage a slice of that mapping, so a storage's address minus the lowest one equals its
    record's offset minus the lowest record offset; the result is checked against the
    records themselves, so a torch whose layout differs yields ``None``, never wrong offsets.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        skeleton: dict[str, Any] = {
            name: torch.empty(tuple(shape), dtype=dtype) for name, (shape, dtype) in tensors.items()
        }
    skeleton.update(values)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, path)
    del skeleton
    reader = torch._C.PyTorchFileReader(path)
    records = [r for r in reader.get_all_records() if _DATA_RECORD.fullmatch(r)]
    if len(records) != len(tensors):
        return None
    offsets = sorted(reader.get_record_offset(r) for r in records)
    try:
        loaded = torch.load(path, mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - values this process itself just saved: re-read once
        loaded = torch.load(path, mmap=True, weights_only=False)
    addresses = {name: loaded[name].untyped_storage().data_ptr() for name in tensors}
    del loaded
    if not addresses:
        return {}
    low = min(addresses.values())
    result = {name: offsets[0] + address - low for name, address in addresses.items()}
    return result if sorted(result.values()) == offsets else None
