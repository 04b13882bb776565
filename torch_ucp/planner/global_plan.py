"""The coordinator's save planning on columns: deduplicate, pick writers, check coverage.

Every item of every rank becomes one row; a row's key is the linear position of its box's first
element in one address space spanning all tensors (``base[tensor] + ravel(offsets)``), so one
``argsort`` of int64 keys groups the holders of each fragment. Nothing loops over items in
Python: at 8,192 ranks x 2,900 items the whole step is a handful of numpy passes (see
``benchmarks/plan_scale.py``). The only Python loop is over *replicated* fragments, to give
each to its least-loaded holder.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
    TensorStorageMetadata,
)

from torch_ucp.metadata.dtypes import name_to_dtype
from torch_ucp.planner.plan_table import BYTES, LocalPlanTable, WriterAssignment


@dataclass
class KeyInfo:
    """One key of the global plan: a tensor (dtype, global shape, layout) or a bytes value."""

    name: str
    kind: str
    dtype: str | None
    shape: tuple[int, ...] | None
    layout: list[Any] | None  # [mesh, placements] of the first rank reporting it
    first_rank: int
    path: list[Any] | None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape is not None else 0


@dataclass
class FragmentTable:
    """The unique fragments of a save, grouped by key and sorted by offsets within each key.

    ``offsets``/``lengths`` are padded to the widest tensor; ``start[k]:start[k + 1]`` are the
    rows of key ``k``; ``writer`` is the rank that writes each fragment.
    """

    keys: list[KeyInfo]
    start: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    writer: np.ndarray

    def rows(self, k: int) -> slice:
        return slice(int(self.start[k]), int(self.start[k + 1]))

    def chunks(self, k: int) -> tuple[list[list[int]], list[list[int]]]:
        ndim = len(self.keys[k].shape or ())
        rows = self.rows(k)
        return self.offsets[rows, :ndim].tolist(), self.lengths[rows, :ndim].tolist()


@dataclass
class Catalog:
    """One distinct catalog (shared by every rank that sent the same one)."""

    layouts: list[list[Any]]  # [mesh, placements]
    global_key: np.ndarray  # catalog index -> global key index
    layout: np.ndarray  # catalog index -> layout index, -1 if none

    def layout_of(self, k: int) -> int:
        """The layout of global key ``k`` in this catalog."""
        local = np.flatnonzero(self.global_key == k)
        return int(self.layout[local[0]]) if len(local) else -1


@dataclass
class GlobalPlan:
    """The coordinator's result: each rank's writer assignment, the unique fragments, and the
    catalog each rank planned with."""

    assignments: list[WriterAssignment]
    fragments: FragmentTable
    catalogs: list[Catalog]


class ChunkList(Sequence):
    """A tensor's chunks as arrays; ``ChunkStorageMetadata`` objects are made on access (a
    load planner asks only for the chunks its boxes overlap, see :class:`BoxIndex`)."""

    def __init__(self, offsets: np.ndarray, lengths: np.ndarray) -> None:
        self.offsets, self.lengths = offsets, lengths

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return ChunkStorageMetadata(
            torch.Size(self.offsets[i].tolist()), torch.Size(self.lengths[i].tolist())
        )

    def __iter__(self) -> Iterator[ChunkStorageMetadata]:
        for o, n in zip(self.offsets.tolist(), self.lengths.tolist()):
            yield ChunkStorageMetadata(torch.Size(o), torch.Size(n))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))


class StateDictMetadata(Mapping):
    """DCP's ``state_dict_metadata`` built on demand from a :class:`FragmentTable`: millions of
    ``ChunkStorageMetadata`` objects are only made if a stock writer asks for them (it pickles
    this mapping as a plain dict)."""

    def __init__(self, fragments: FragmentTable) -> None:
        self.fragments = fragments
        self._index = {k.name: i for i, k in enumerate(fragments.keys)}
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> TensorStorageMetadata | BytesStorageMetadata:
        found = self._cache.get(name)
        if found is None:
            k = self._index[name]
            key = self.fragments.keys[k]
            if key.kind == BYTES:
                found = BytesStorageMetadata()
            else:
                rows, ndim = self.fragments.rows(k), len(key.shape)
                found = TensorStorageMetadata(
                    properties=TensorProperties(dtype=name_to_dtype(key.dtype)),
                    size=torch.Size(key.shape),
                    chunks=ChunkList(
                        self.fragments.offsets[rows, :ndim], self.fragments.lengths[rows, :ndim]
                    ),
                )
            self._cache[name] = found
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self.items()),))


def plan_globally(tables: Sequence[LocalPlanTable]) -> GlobalPlan:
    """Deduplicate all ranks' items, give every fragment one writer, check each tensor is
    tiled exactly."""
    keys, catalogs = _merge_catalogs(tables)
    ndim = max((t.ndim for t in tables), default=0)
    counts = np.array([len(t) for t in tables], dtype=np.int64)
    key = np.concatenate([catalogs[r].global_key[t.key] for r, t in enumerate(tables)]) if len(tables) else np.empty(0, np.int64)
    rank = np.repeat(np.arange(len(tables), dtype=np.int32), counts)
    offsets = _stack([t.offsets for t in tables], ndim, 0)
    lengths = _stack([t.lengths for t in tables], ndim, 1)
    nbytes = np.concatenate([t.nbytes for t in tables]) if len(tables) else np.empty(0, np.int64)

    shapes = np.ones((len(keys), ndim), dtype=np.int64)
    for k, info in enumerate(keys):
        if info.shape:
            shapes[k, : len(info.shape)] = info.shape
    _check_bounds(keys, key, offsets, lengths, shapes, rank)

    # One address space for all keys: every key gets at least one slot (bytes values, empties).
    strides = np.ones_like(shapes)
    if ndim > 1:
        strides[:, :-1] = np.cumprod(shapes[:, :0:-1], axis=1)[:, ::-1]
    slots = np.maximum(np.prod(shapes, axis=1), 1)
    base = np.concatenate([[0], np.cumsum(slots)[:-1]])
    position = base[key] + (offsets * strides[key]).sum(axis=1)

    order = np.argsort(position, kind="stable")  # holders of a fragment: ascending rank
    sorted_pos = position[order]
    first_of_group = np.empty(len(order), dtype=bool)
    first_of_group[:1] = True
    np.not_equal(sorted_pos[1:], sorted_pos[:-1], out=first_of_group[1:])
    starts = np.flatnonzero(first_of_group)
    holders = np.diff(np.append(starts, len(order)))
    first = order[starts]
    _check_same_boxes(keys, key, offsets, lengths, rank, order, first, holders)

    writer = _pick_writers(rank, nbytes, order, starts, holders, first, len(tables))
    keep_sorted = rank[order] == np.repeat(writer, holders)
    keep = np.empty(len(order), dtype=bool)
    keep[order] = keep_sorted
    bounds = np.concatenate([[0], np.cumsum(counts)])
    assignments = [WriterAssignment(keep[bounds[r] : bounds[r + 1]]) for r in range(len(tables))]

    group_key = key[first]
    start = np.searchsorted(group_key, np.arange(len(keys) + 1), side="left")
    fragments = FragmentTable(keys, start, offsets[first], lengths[first], writer)
    _check_coverage(fragments)
    return GlobalPlan(assignments, fragments, catalogs)


def _merge_catalogs(tables: Sequence[LocalPlanTable]) -> tuple[list[KeyInfo], list[Catalog]]:
    """Global keys in first-seen order, and each rank's parsed catalog."""
    keys: list[KeyInfo] = []
    index: dict[str, int] = {}
    parsed: dict[str, Catalog] = {}
    rank_catalogs = []
    for rank, table in enumerate(tables):
        found = parsed.get(table.digest)
        if found is None:
            catalog = table.parse_catalog()
            layouts = catalog["layouts"]
            mapping = np.empty(len(catalog["keys"]), dtype=np.int64)
            key_layout = np.array([entry[4] for entry in catalog["keys"]], dtype=np.int64)
            for i, (name, kind, dtype, shape, layout, path) in enumerate(catalog["keys"]):
                k = index.get(name)
                if k is None:
                    k = index[name] = len(keys)
                    keys.append(
                        KeyInfo(name, kind, dtype, tuple(shape) if shape is not None else None,
                                layouts[layout] if layout >= 0 else None, rank, path)
                    )
                else:
                    other = keys[k]
                    if (other.kind, other.dtype, other.shape) != (kind, dtype, _tuple(shape)):
                        raise ValueError(
                            f"{name}: ranks disagree on the tensor: rank {other.first_rank} has "
                            f"global shape {other.shape} dtype {other.dtype}, rank {rank} has "
                            f"{_tuple(shape)} dtype {dtype}"
                        )
                mapping[i] = k
            found = parsed[table.digest] = Catalog(layouts, mapping, key_layout)
        rank_catalogs.append(found)
    return keys, rank_catalogs


def _tuple(shape: Any) -> tuple[int, ...] | None:
    return tuple(shape) if shape is not None else None


def _stack(arrays: list[np.ndarray], ndim: int, fill: int) -> np.ndarray:
    total = sum(len(a) for a in arrays)
    out = np.full((total, ndim), fill, dtype=np.int64)
    row = 0
    for a in arrays:
        out[row : row + len(a), : a.shape[1]] = a
        row += len(a)
    return out


def _key_of_row(keys: list[KeyInfo], key: np.ndarray, row: int) -> tuple[KeyInfo, int]:
    """The key of item ``row`` and its number of dimensions (for error messages)."""
    info = keys[int(key[row])]
    return info, len(info.shape or ())


def _check_bounds(keys, key, offsets, lengths, shapes, rank) -> None:
    bad = ((offsets < 0) | (offsets + lengths > shapes[key])).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        info, nd = _key_of_row(keys, key, i)
        raise ValueError(
            f"{info.name}: rank {int(rank[i])} holds a fragment at offsets "
            f"{offsets[i, :nd].tolist()} of lengths {lengths[i, :nd].tolist()} outside the "
            f"tensor's global shape {info.shape}"
        )


def _check_same_boxes(keys, key, offsets, lengths, rank, order, first, holders) -> None:
    """Holders of one fragment must agree on its extent (a mismatch means overlapping shards)."""
    if len(order) == len(first):
        return
    differs = (lengths[order] != np.repeat(lengths[first], holders, axis=0)).any(axis=1)
    if differs.any():
        i = int(order[np.flatnonzero(differs)[0]])
        j = int(first[np.searchsorted(np.cumsum(holders), np.flatnonzero(differs)[0], side="right")])
        info, nd = _key_of_row(keys, key, i)
        raise ValueError(
            f"{info.name}: ranks {int(rank[j])} and {int(rank[i])} hold different fragments at "
            f"offsets {offsets[i, :nd].tolist()}: lengths {lengths[j, :nd].tolist()} and "
            f"{lengths[i, :nd].tolist()}; the sharding cannot be described exactly"
        )


def _pick_writers(rank, nbytes, order, starts, holders, first, world: int) -> np.ndarray:
    """Sole holders write their fragments; replicated ones go, largest first, to the holder
    with the fewest bytes so far (ties: lowest rank)."""
    writer = rank[first].astype(np.int64)
    sole = holders == 1
    load = np.bincount(rank[first[sole]], weights=nbytes[first[sole]], minlength=world).astype(np.int64)
    shared = np.flatnonzero(~sole)
    if len(shared) == 0:
        return writer
    shared = shared[np.argsort(-nbytes[first[shared]], kind="stable")]
    sorted_rank = rank[order]
    load_list = load.tolist()
    sizes = nbytes[first[shared]].tolist()
    picks = []
    for g, size in zip(shared.tolist(), sizes):
        s = starts[g]
        candidates = sorted_rank[s : s + holders[g]].tolist()
        best = min(candidates, key=load_list.__getitem__)
        load_list[best] += size
        picks.append(best)
    writer[shared] = picks
    return writer


def _check_coverage(fragments: FragmentTable) -> None:
    numel = np.prod(fragments.lengths, axis=1, dtype=np.int64)
    for k, info in enumerate(fragments.keys):
        if info.kind == BYTES:
            continue
        rows = fragments.rows(k)
        covered = int(numel[rows].sum())
        if covered != info.numel and info.numel != 0:
            raise ValueError(
                f"{info.name}: fragments cover {covered} of {info.numel} elements of a tensor of "
                f"shape {info.shape}; the sharding cannot be described exactly"
            )
