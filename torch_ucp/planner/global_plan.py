"""The coordinator's save planning on columns: deduplicate, pick writers, check coverage.

Every item of every rank becomes one row; a row's key is the linear position of its box's first
element in one address space spanning all tensors (``base[tensor] + ravel(offsets)``), so one
``argsort`` of int64 keys groups the holders of each fragment. Nothing loops over items in
Python: at 8,192 ranks x 2,900 items the whole step is a handful of numpy passes (see
``benchmarks/plan_scale.py``).

Writers: a DTensor fragment held by several ranks (replicated over some mesh dims) is written
by the holder the format's routing rule names (:mod:`torch_ucp.metadata.routing`), so that a
loading rank can tell from the header alone which rank's fragment index lists it. Fragments of
other keys (plain tensors, values, layouts the rule does not describe) go to their lowest-rank
holder when small, else, largest first, to the holder with the fewest bytes so far; their
writers are then recorded in the header. The only Python loop is over those.
"""

from __future__ import annotations

import json
import math
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

from torch_ucp.errors import SavePlanError
from torch_ucp.metadata.dtypes import name_to_dtype
from torch_ucp.metadata.fields import Fields
from torch_ucp.metadata.routing import rule_writers, split_dims
from torch_ucp.metadata.schema import ROTATE_MIN_BYTES, DimMap, MeshInfo, PlacementInfo, Segment
from torch_ucp.planner.plan_table import BYTES, LocalPlanTable, WriterAssignment


@dataclass
class KeyInfo:
    """One key of the global plan: a tensor (dtype, global shape, layout) or a bytes value."""

    name: str
    kind: str
    dtype: str | None
    shape: tuple[int, ...] | None
    layout: int  # index into GlobalPlan.layouts (as the first rank reported it), -1 if none
    first_rank: int
    path: list[Any] | None
    dim_map: DimMap | None = None
    derived: bool = False  # writers follow the routing rule (set by plan_globally)
    ordinal: int = -1  # position among the tensors (the header's tensor table)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape is not None else 0

    @property
    def nbytes(self) -> int:
        return self.numel * name_to_dtype(self.dtype).itemsize if self.dtype else 0


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


@dataclass
class Catalog:
    """One distinct catalog (shared by every rank that sent the same one)."""

    global_key: np.ndarray  # catalog index -> global key index
    layout: np.ndarray  # catalog index -> global layout index, -1 if none


@dataclass(frozen=True)
class Layout:
    """A DTensor layout: the mesh (with its rank table) and the placements."""

    mesh: MeshInfo
    placements: tuple[PlacementInfo, ...]


@dataclass
class GlobalPlan:
    """The coordinator's result: each rank's writer assignment, the unique fragments, and the
    distinct layouts the keys refer to."""

    assignments: list[WriterAssignment]
    fragments: FragmentTable
    layouts: list[Layout]

    def key_writers(self, k: int) -> np.ndarray:
        """The distinct writer ranks of key ``k``'s fragments."""
        return np.unique(self.fragments.writer[self.fragments.rows(k)])


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


def plan_globally(
    tables: Sequence[LocalPlanTable], rotate_min_bytes: int = ROTATE_MIN_BYTES
) -> GlobalPlan:
    """Deduplicate all ranks' items, give every fragment one writer, check each tensor is
    tiled exactly."""
    keys, catalogs, layouts = _merge_catalogs(tables)
    ndim = max((t.ndim for t in tables), default=0)
    shapes = np.ones((len(keys), ndim), dtype=np.int64)
    for k, info in enumerate(keys):
        if info.shape:
            shapes[k, : len(info.shape)] = info.shape
    # One address space for all keys: every key gets at least one slot (bytes values, empties).
    strides = np.ones_like(shapes)
    if ndim > 1:
        strides[:, :-1] = np.cumprod(shapes[:, :0:-1], axis=1)[:, ::-1]
    slots = np.maximum(np.prod(shapes, axis=1), 1)
    base = np.concatenate([[0], np.cumsum(slots)[:-1]]).astype(np.int64)
    # each fragment's extent as one int64 (exact: dims' bit widths add up to at most 63)
    bits = [max(int(shapes[:, d].max(initial=1)).bit_length(), 1) for d in range(ndim)]
    packable = sum(bits) <= 63
    shifts = np.concatenate([[0], np.cumsum(bits)[:-1]]).astype(np.int64) if ndim else np.zeros(0, np.int64)
    coord = np.int32 if shapes.max(initial=1) < 2**31 else np.int64

    counts = np.array([len(t) for t in tables], dtype=np.int64)
    total = int(counts.sum())
    key = np.empty(total, dtype=np.int32)
    offsets = np.empty((total, ndim), dtype=coord)
    lengths = np.empty((total, ndim), dtype=coord)
    nbytes = np.empty(total, dtype=np.int64)
    position = np.empty(total, dtype=np.int64)
    extent = np.empty(total, dtype=np.int64) if packable else None
    row = 0
    for r, table in enumerate(tables):  # one table at a time: small arrays, cache-friendly
        t_key, t_off, t_len, t_bytes = table.arrays()
        n, d = len(t_key), t_off.shape[1]
        g = catalogs[r].global_key[t_key]
        sl = slice(row, row + n)
        key[sl] = g
        offsets[sl, :d], lengths[sl, :d] = t_off, t_len
        offsets[sl, d:], lengths[sl, d:] = 0, 1
        nbytes[sl] = t_bytes
        o, ln = offsets[sl].astype(np.int64), lengths[sl].astype(np.int64)
        _check_bounds(keys, g, o, ln, shapes[g], r)
        position[sl] = base[g] + (o * strides[g]).sum(axis=1)
        if extent is not None:
            extent[sl] = (ln << shifts).sum(axis=1)
        row += n
    rank = np.repeat(np.arange(len(tables), dtype=np.int32), counts)

    order = np.argsort(position, kind="stable")  # holders of a fragment: ascending rank
    sorted_pos = position[order]
    del position
    first_of_group = np.empty(len(order), dtype=bool)
    first_of_group[:1] = True
    np.not_equal(sorted_pos[1:], sorted_pos[:-1], out=first_of_group[1:])
    del sorted_pos
    starts = np.flatnonzero(first_of_group)
    holders = np.diff(np.append(starts, len(order)))
    first = order[starts]
    _check_same_boxes(keys, key, offsets, lengths, rank, order, first_of_group, extent)
    del first_of_group, extent

    writer = _pick_writers(
        keys, layouts, key, rank, nbytes, order, starts, holders, first, len(tables), rotate_min_bytes
    )
    keep = np.zeros(total, dtype=bool)
    sole = holders == 1
    keep[first[sole]] = True
    shared = np.flatnonzero(~sole)
    if len(shared):  # of replicated groups, the writer's row
        member_rows = np.repeat(starts[shared], holders[shared]) + _ranges(holders[shared])
        rows_sorted = order[member_rows]
        keep[rows_sorted[rank[rows_sorted] == np.repeat(writer[shared], holders[shared])]] = True
    bounds = np.concatenate([[0], np.cumsum(counts)])
    assignments = [WriterAssignment(keep[bounds[r] : bounds[r + 1]]) for r in range(len(tables))]

    group_key = key[first]
    start = np.searchsorted(group_key, np.arange(len(keys) + 1), side="left")
    fragments = FragmentTable(
        keys, start, offsets[first].astype(np.int64), lengths[first].astype(np.int64), writer
    )
    _check_coverage(fragments)
    return GlobalPlan(assignments, fragments, layouts)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``[0..c0), [0..c1), ...`` concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(ends - counts, counts)


def _merge_catalogs(tables: Sequence[LocalPlanTable]) -> tuple[list[KeyInfo], list[Catalog], list[Layout]]:
    """Global keys in first-seen order, each rank's parsed catalog, and the distinct layouts.
    A key reported with different layouts by different ranks gets layout -1 (no derivable
    writers)."""
    keys: list[KeyInfo] = []
    index: dict[str, int] = {}
    layouts: list[Layout] = []
    layout_index: dict[str, int] = {}
    parsed: dict[str, Catalog] = {}
    rank_catalogs = []
    fields = Fields("the local plan of a rank")
    ordinal = 0
    for rank, table in enumerate(tables):
        found = parsed.get(table.digest)
        if found is None:
            catalog = table.parse_catalog()
            ids = []
            for mesh, placements in catalog["layouts"]:
                token = json.dumps([mesh, placements], sort_keys=True)
                if token not in layout_index:
                    layout_index[token] = len(layouts)
                    layouts.append(Layout(fields.mesh(mesh, "mesh"), fields.placements(placements, "placements")))
                ids.append(layout_index[token])
            mapping = np.empty(len(catalog["keys"]), dtype=np.int64)
            key_layout = np.array([ids[entry[4]] if entry[4] >= 0 else -1 for entry in catalog["keys"]], dtype=np.int64)
            for i, (name, kind, dtype, shape, _, path, dim_map) in enumerate(catalog["keys"]):
                k = index.get(name)
                if k is None:
                    k = index[name] = len(keys)
                    info = KeyInfo(name, kind, dtype, tuple(shape) if shape is not None else None,
                                   int(key_layout[i]), rank, path, _dim_map(dim_map, shape))
                    if kind != BYTES:
                        info.ordinal, ordinal = ordinal, ordinal + 1
                    keys.append(info)
                else:
                    other = keys[k]
                    if (other.kind, other.dtype, other.shape) != (kind, dtype, _tuple(shape)):
                        raise SavePlanError(
                            f"{name}: ranks disagree on the tensor: rank {other.first_rank} has "
                            f"global shape {other.shape} dtype {other.dtype}, rank {rank} has "
                            f"{_tuple(shape)} dtype {dtype}"
                        )
                    if other.layout != key_layout[i] or other.dim_map != _dim_map(dim_map, shape):
                        other.layout = -1
                mapping[i] = k
            found = parsed[table.digest] = Catalog(mapping, key_layout)
        rank_catalogs.append(found)
    return keys, rank_catalogs, layouts


def _dim_map(value: Any, shape: Any) -> DimMap | None:
    if value is None:
        return None
    dim, physical, segments = value
    return DimMap(dim, physical, shape[dim], tuple(Segment(*seg) for seg in segments))


def _tuple(shape: Any) -> tuple[int, ...] | None:
    return tuple(shape) if shape is not None else None


def _check_bounds(keys, global_key, offsets, lengths, shapes, rank: int) -> None:
    bad = ((offsets < 0) | (offsets + lengths > shapes)).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        info = keys[int(global_key[i])]
        nd = len(info.shape or ())
        raise SavePlanError(
            f"{info.name}: rank {rank} holds a fragment at offsets "
            f"{offsets[i, :nd].tolist()} of lengths {lengths[i, :nd].tolist()} outside the "
            f"tensor's global shape {info.shape}"
        )


def _check_same_boxes(keys, key, offsets, lengths, rank, order, first_of_group, extent) -> None:
    """Holders of one fragment must agree on its extent (a mismatch means overlapping shards)."""
    if first_of_group.all():
        return
    if extent is not None:  # extents packed into one int64: compare neighbours in sorted order
        ext = extent[order]
        differs = np.flatnonzero((ext[1:] != ext[:-1]) & ~first_of_group[1:]) + 1
    else:
        group = np.cumsum(first_of_group) - 1
        first_row = order[np.flatnonzero(first_of_group)][group]
        differs = np.flatnonzero((lengths[order] != lengths[first_row]).any(axis=1))
    if len(differs) == 0:
        return
    at = int(differs[0])
    i = int(order[at])
    j = int(order[at - 1] if extent is not None else order[np.flatnonzero(first_of_group[: at + 1])[-1]])
    info = keys[int(key[i])]
    nd = len(info.shape or ())
    raise SavePlanError(
        f"{info.name}: ranks {int(rank[j])} and {int(rank[i])} hold different fragments at "
        f"offsets {offsets[i, :nd].tolist()}: lengths {lengths[j, :nd].tolist()} and "
        f"{lengths[i, :nd].tolist()}; the sharding cannot be described exactly"
    )


def _pick_writers(
    keys: list[KeyInfo],
    layouts: list[Layout],
    key: np.ndarray,
    rank: np.ndarray,
    nbytes: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    holders: np.ndarray,
    first: np.ndarray,
    world: int,
    rotate_min_bytes: int,
) -> np.ndarray:
    """One writer per fragment group (see the module docstring); marks ``KeyInfo.derived``."""
    writer = rank[first].astype(np.int64)  # sole holders write their fragments
    group_key = key[first]
    ordinal = np.array([info.ordinal for info in keys], dtype=np.int64)
    key_bytes = np.array([info.nbytes for info in keys], dtype=np.int64)
    # DTensor keys whose layout names every holder: the rule decides, if every group is held
    # by a whole replica group
    replicas = np.zeros(len(keys), dtype=np.int64)
    for k, info in enumerate(keys):
        if info.layout >= 0 and info.kind != BYTES and key_bytes[k] > 0:
            mesh, placements = layouts[info.layout].mesh, layouts[info.layout].placements
            if mesh.ranks is not None and max(mesh.ranks) < world:
                replicas[k] = math.prod(n for n, p in zip(mesh.shape, placements) if p.kind == "replicate")
    whole = np.bincount(group_key, weights=holders != replicas[group_key], minlength=len(keys)) == 0
    candidate = (replicas > 0) & whole
    for k in np.flatnonzero(candidate & (replicas == 1)).tolist():
        keys[k].derived = True
    done = (holders == 1) | candidate[group_key]
    shared = np.flatnonzero(candidate[group_key] & (holders > 1))
    if len(shared):
        _derive(keys, layouts, shared, group_key, first, starts, holders, rank, order, writer,
                world, ordinal, key_bytes, rotate_min_bytes)
        failed = np.zeros(len(keys), dtype=bool)
        failed[group_key[shared[writer[shared] < 0]]] = True
        for k in np.flatnonzero(candidate & (replicas > 1)).tolist():
            keys[k].derived = not failed[k]
        done &= ~failed[group_key]
    rest = np.flatnonzero(~done)
    if len(rest) == 0:
        return writer
    sorted_rank = rank[order].astype(np.int64)
    small = rest[nbytes[first[rest]] < rotate_min_bytes]
    writer[small] = sorted_rank[starts[small]]  # lowest-rank holder
    rest = rest[nbytes[first[rest]] >= rotate_min_bytes]
    fixed = np.ones(len(first), dtype=bool)
    fixed[rest] = False
    load = np.bincount(writer[fixed], weights=nbytes[first[fixed]], minlength=world).astype(np.int64)
    rest = rest[np.argsort(-nbytes[first[rest]], kind="stable")]  # largest first, to the
    load_list = load.tolist()  # holder with the fewest bytes so far (ties: lowest rank)
    picks = []
    for g, size in zip(rest.tolist(), nbytes[first[rest]].tolist()):
        s = starts[g]
        best = min(sorted_rank[s : s + holders[g]].tolist(), key=load_list.__getitem__)
        load_list[best] += size
        picks.append(best)
    writer[rest] = picks
    return writer


def _derive(
    keys, layouts, groups, group_key, first, starts, holders, rank, order, writer, world,
    ordinal, key_bytes, rotate_min_bytes,
) -> None:
    """The rule's writer of each replicated group in ``groups``, or -1 where that rank does not
    hold the fragment (the key then is not derived)."""
    lids = np.array([keys[k].layout for k in group_key[groups].tolist()], dtype=np.int64)
    for lid in np.unique(lids).tolist():
        g = groups[lids == lid]
        mesh, placements = layouts[lid].mesh, layouts[lid].placements
        s_dims, _ = split_dims(placements, len(mesh.shape))
        position = np.full(world, -1, dtype=np.int64)
        position[mesh.rank_array] = np.arange(mesh.size, dtype=np.int64)
        coords = np.stack(np.unravel_index(position[rank[first[g]]], mesh.shape), axis=1)
        gk = group_key[g]
        chosen = rule_writers(mesh, placements, coords[:, s_dims], ordinal[gk], key_bytes[gk], rotate_min_bytes)
        # is the chosen rank among the group's holders (ascending in sorted order)?
        member_rows = np.repeat(starts[g], holders[g]) + _ranges(holders[g])
        members = np.repeat(np.arange(len(g), dtype=np.int64), holders[g]) * world + rank[order[member_rows]]
        wanted = np.arange(len(g), dtype=np.int64) * world + chosen
        found = np.searchsorted(members, wanted)
        ok = (found < len(members)) & (members[np.minimum(found, len(members) - 1)] == wanted)
        writer[g] = np.where(ok, chosen, -1)


def _check_coverage(fragments: FragmentTable) -> None:
    numel = np.prod(fragments.lengths, axis=1, dtype=np.int64)
    for k, info in enumerate(fragments.keys):
        if info.kind == BYTES:
            continue
        rows = fragments.rows(k)
        covered = int(numel[rows].sum())
        if covered != info.numel and info.numel != 0:
            raise SavePlanError(
                f"{info.name}: fragments cover {covered} of {info.numel} elements of a tensor of "
                f"shape {info.shape}; the sharding cannot be described exactly"
            )
