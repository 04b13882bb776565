"""UCPLoadPlanner: plan every target tensor, of any placement, against the saved fragments."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from torch_ucp import _compat
from torch_ucp.errors import CorruptCheckpointError, LoadPlanError
from torch_ucp.metadata.catalog import FragmentCatalog
from torch_ucp.metadata.dtypes import convertible
from torch_ucp.metadata.placements import Box, narrow
from torch_ucp.metadata.provenance import SaveInfo
from torch_ucp.metadata.tiling import tiling_problem
from torch_ucp.metadata.values import load_torch_save
from torch_ucp.patterns.base import DimMap, Pattern
from torch_ucp.patterns.engine import (
    PatternError,
    PatternSet,
    as_patterns,
    dim_map_for,
    logical_shape,
    map_box,
)
from torch_ucp.patterns.fused import FusedParam
from torch_ucp.patterns.rename import Rename
from torch_ucp.planner import sharded_tensor
from torch_ucp.planner.boxes import BoxIndex, intersect
from torch_ucp.planner.global_plan import ChunkList
from torch_ucp.planner.layout import tensor_boxes
from torch_ucp.planner.plan_table import RankLocalItems

_MAX_LISTED = 20


@dataclass
class _Saved:
    """A saved tensor as the planner sees it: its stored key, metadata, and (for stock
    checkpoints described by ``saved_patterns``) the map from logical to stored indices.

    Its fragments come from the checkpoint's :class:`FragmentCatalog` (torch_ucp checkpoints:
    only the rows the boxes overlap are ever fetched) or from DCP's chunk list (stock ones)."""

    key: str
    md: TensorStorageMetadata
    dmap: DimMap | None = None
    catalog: FragmentCatalog | None = None
    _index: BoxIndex | None = None

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return logical_shape(self.md.size, self.dmap)

    def chunks(self, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        """``(offsets, lengths, row)`` of the stored chunks tiling the stored box (checked: a
        gap or an overlap raises, naming the tensor)."""
        if self.catalog is not None:
            return [(f.offsets, f.lengths, f.row) for f in self.catalog.fragments_for(self.key, offsets, lengths)]
        if self._index is None:
            chunks = self.md.chunks
            if isinstance(chunks, ChunkList):  # columns already: no per-chunk objects
                self._index = BoxIndex(chunks.offsets, chunks.lengths, len(self.md.size))
            else:
                self._index = BoxIndex([c.offsets for c in chunks], [c.sizes for c in chunks], len(self.md.size))
        hits = self._index.overlapping(offsets, lengths)
        lo, hi = self._index.bounds(hits)
        q = np.asarray(offsets, dtype=np.int64)
        problem = tiling_problem(lo, hi, q, q + np.asarray(lengths, dtype=np.int64))
        if problem is not None:
            raise CorruptCheckpointError(
                f"the chunks of {self.key!r} do not tile the box at offsets {list(offsets)} "
                f"lengths {list(lengths)}: {problem}"
            )
        out = []
        for i in hits:
            chunk = self.md.chunks[i]
            out.append((tuple(chunk.offsets), tuple(chunk.sizes), i))
        return out


class _Unloadable(Exception):
    """A target the checkpoint holds in a form it cannot take; the message names it."""


@dataclass
class _TargetPlans:
    """The targets of one load planned: their reads (and box requests), the targets the
    checkpoint lacks, the problems of those it cannot fill, and the saved keys they use."""

    items: list[Any] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)


@dataclass
class _BoxRequest:
    """Read the stored box ``offsets``/``lengths`` of ``saved`` into target ``fqn`` at
    ``dest``; ``src_to_dest[k]`` is the destination dim of source dim ``k`` (``None`` for a dim
    the destination lacks)."""

    fqn: str
    saved: _Saved
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    dest: tuple[int, ...]
    src_to_dest: list[int | None]
    shard: tuple[int, ...] | None = None  # a ShardedTensor target: its local shard's offsets


def _box_requests(
    target_fqn: str,
    dest_offsets: tuple[int, ...],
    src_offsets: tuple[int, ...],
    lengths: tuple[int, ...],
    saved: _Saved,
    src_to_dest: list[int | None],
    shard: tuple[int, ...] | None = None,
) -> list[_BoxRequest]:
    """The stored boxes behind the logical source box ``src_offsets``/``lengths`` of
    ``saved`` (more than one where a saved pattern interleaves or pads the stored tensor)."""
    if saved.dmap is None:
        return [_BoxRequest(target_fqn, saved, src_offsets, lengths, dest_offsets, src_to_dest, shard)]
    d = saved.dmap.dim
    out = []
    for stored, n, logical in saved.dmap.to_physical(src_offsets[d], lengths[d]):
        shift = logical - src_offsets[d]
        dest = list(dest_offsets)
        if src_to_dest[d] is not None:
            dest[src_to_dest[d]] += shift
        out.append(
            _BoxRequest(
                target_fqn,
                saved,
                src_offsets[:d] + (stored,) + src_offsets[d + 1 :],
                lengths[:d] + (n,) + lengths[d + 1 :],
                tuple(dest),
                src_to_dest,
                shard,
            )
        )
    return out


def _read_items(request: _BoxRequest) -> list[ReadItem]:
    items = []
    off, lens = request.offsets, request.lengths
    if math.prod(lens) == 0:
        return items
    for chunk_offsets, chunk_sizes, row in request.saved.chunks(off, lens):
        hit = intersect(off, lens, chunk_offsets, chunk_sizes)
        if hit is None:
            continue
        hit_off, hit_len = hit
        dest_at = list(request.dest)
        for k, dk in enumerate(request.src_to_dest):
            if dk is not None:
                dest_at[dk] += hit_off[k] - off[k]
        items.append(
            ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(request.fqn, request.shard),
                dest_offsets=torch.Size(dest_at),
                storage_index=MetadataIndex(request.saved.key, chunk_offsets, row),
                storage_offsets=torch.Size(o - c for o, c in zip(hit_off, chunk_offsets)),
                lengths=torch.Size(hit_len),
            )
        )
    return items


class UCPLoadPlanner(DefaultLoadPlanner):
    """Loads a checkpoint into any layout: DTensors of any placement on any mesh, or plain tensors.

    Every target tensor is described by the exact boxes this rank holds; each box is planned
    against the saved fragments (torch_ucp checkpoints) or chunks (stock DCP checkpoints), so
    each rank reads exactly the bytes it needs. Patterns (:mod:`torch_ucp.patterns`) map fused,
    padded, stacked and renamed parameters, and all their optimizer states, to the stored
    logical tensors.

    Keys, as in DCP's :class:`DefaultLoadPlanner`: keys of the checkpoint absent from the target
    are ignored (load the model alone from a model + optimizer checkpoint), and keys of the
    target absent from the checkpoint raise :class:`~torch_ucp.errors.LoadPlanError` naming them.

    Args:
        strict: also refuse keys of the checkpoint absent from the target (every saved key
            must be loaded).
        allow_missing: target keys absent from the checkpoint that are not errors (they keep
            their current values): ``True`` for all, or shell patterns of keys (``"optim.*"``).
        allow_partial_load: DCP's flag, kept as an alias of ``allow_missing=True`` (unexpected
            keys are ignored anyway); cannot be combined with ``strict=True``.
        patterns: layout rules of the target state dict, strict (each must match). Default:
            those recorded in the checkpoint at save time, or else those of ``saved_patterns``
            (fused degrees then read from the target's mesh), without their renames and applied
            only where they match (a pipeline stage holds a subset of the parameters).
        saved_patterns: layout rules of a checkpoint saved without torch_ucp patterns (a stock
            DCP checkpoint): how its stored tensors relate to the logical ones.
        flatten_state_dict / flatten_sharded_tensors: as in DCP's :class:`DefaultLoadPlanner`.
        allow_pickle: values of stock DCP checkpoints (``torch.save`` bytes) are loaded with
            ``weights_only=True``; ``True`` allows full unpickling (runs code the checkpoint
            names: only for checkpoints you trust). torch_ucp checkpoints' values are decoded by
            :class:`~torch_ucp.UCPReader` (its own ``allow_pickle``).

    A dtype change is allowed: the saved values are cast into the target's dtype.
    """

    def __init__(
        self,
        *,
        strict: bool = False,
        allow_missing: bool | str | Sequence[str] = False,
        allow_partial_load: bool = False,
        patterns: list[Any] | None = None,
        saved_patterns: list[Any] | None = None,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        self.allow_pickle = bool(allow_pickle)
        if allow_partial_load:
            if strict:
                raise ValueError(
                    "UCPLoadPlanner: allow_partial_load=True allows keys missing from the "
                    "checkpoint; combine strict=True with allow_missing=True instead"
                )
            allow_missing = True
        super().__init__(
            flatten_state_dict=flatten_state_dict,
            flatten_sharded_tensors=flatten_sharded_tensors,
            allow_partial_load=allow_missing is True,
        )
        self.strict = strict
        self.allow_missing: bool | tuple[str, ...] = (
            (allow_missing,) if isinstance(allow_missing, str)
            else allow_missing if isinstance(allow_missing, bool)
            else tuple(allow_missing)
        )
        self.patterns = patterns
        self.saved_patterns = saved_patterns

    def _may_miss(self, fqn: str) -> bool:
        """Whether ``allow_missing`` lets target key ``fqn`` be absent from the checkpoint."""
        if isinstance(self.allow_missing, bool):
            return self.allow_missing
        return any(fnmatch.fnmatchcase(fqn, p) for p in self.allow_missing)

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self._views: dict[tuple[str, torch.Size | None], torch.Tensor] = {}
        self._stack_dims: dict[str, int] = {}

    # -- planning -------------------------------------------------------------------------
    def _saved_index(self, saved_set: PatternSet) -> dict[str, _Saved | str]:
        """Saved tensors by logical name; non-tensor values map to their stored key."""
        out: dict[str, _Saved | str] = {}
        catalog = self._catalog()
        for key, md in self.metadata.state_dict_metadata.items():
            name = saved_set.rename(key)
            saved_set.note_stacked(name)
            if isinstance(md, BytesStorageMetadata):
                out[name] = key
                continue
            p = saved_set.dim_pattern(name)
            if p is not None and getattr(p, "degree", 0) is None and len(md.size) > p.dim:
                raise PatternError(
                    f"{key}: saved_patterns {p!r} needs degree= (the TP degree the stock "
                    "checkpoint was saved with): stock metadata records no mesh"
                )
            out[name] = _Saved(key, md, dim_map_for(p, key, None, md.size), catalog)
        return out

    def _catalog(self) -> FragmentCatalog | None:
        """The fragment catalog of a torch_ucp checkpoint (``None`` for stock ones)."""
        data = self.metadata.storage_data if self.metadata is not None else None
        return data if isinstance(data, FragmentCatalog) else None

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise LoadPlanError("UCPLoadPlanner needs checkpoint metadata")
        checkpoint = getattr(self.metadata.storage_meta, "checkpoint_id", None) or "checkpoint"
        catalog = self._catalog()
        if catalog is not None:
            recorded = catalog.meta.patterns
        else:
            info = SaveInfo.from_planner_data(self.metadata.planner_data)
            recorded = info.patterns if info is not None else []
        try:
            if self.patterns is not None:
                target_set = PatternSet(self.patterns)
            else:  # rules the caller did not write for this target: applied where they match
                target_set = PatternSet(_default_target_patterns(recorded, self.saved_patterns), strict=False)
            saved_set = PatternSet(self.saved_patterns)
            planned = self._plan(target_set, saved_set)
            target_set.check_used("the target state dict")
            saved_set.check_used(str(checkpoint))
        except PatternError as e:
            raise LoadPlanError(f"cannot load {checkpoint}: {e}") from None
        items, problems, used = planned.items, planned.problems, planned.used
        missing = [fqn for fqn in planned.missing if not self._may_miss(fqn)]
        if missing:
            problems.insert(0, (
                f"missing from {checkpoint}: {_listing(missing)} (pass allow_missing=True, or "
                "allow_missing=[patterns], to leave them as they are)"
            ))
        unexpected = [k for k in self.metadata.state_dict_metadata if k not in used]
        if unexpected and self.strict:
            problems.append(
                f"in {checkpoint} but not in the target state dict: {_listing(unexpected)} "
                "(strict=True refuses them; without it they are ignored)"
            )
        if problems:
            raise LoadPlanError(
                f"cannot load {checkpoint} into this state dict:\n  " + "\n  ".join(problems)
            )
        requests = [r for r in items if isinstance(r, _BoxRequest)]
        if catalog is not None:  # fetch every fragment index these boxes need, at once
            catalog.require((r.saved.key, r.offsets, r.lengths) for r in requests if r.saved.catalog is not None)
        reads = [r for r in items if isinstance(r, ReadItem)]
        for r in requests:
            reads.extend(_read_items(r))
        # the items stay on this rank: DCP's gather of plans to the coordinator carries none
        self.plan = LoadPlan(RankLocalItems(reads, _unreplicated_targets(self.state_dict)))
        return self.plan

    def finish_plan(self, new_plan: LoadPlan) -> LoadPlan:
        """This rank's plan back from the coordinator (which saw no items): the local one."""
        if not new_plan.items and self.plan.items:
            return dataclasses.replace(new_plan, items=list(self.plan.items))
        return new_plan

    def _plan(self, target_set: PatternSet, saved_set: PatternSet) -> _TargetPlans:
        saved = self._saved_index(saved_set)
        planned = _TargetPlans()
        for fqn, target in self.state_dict.items():
            try:
                self._plan_target(fqn, target, target_set, saved, planned)
            except _Unloadable as e:
                planned.problems.append(str(e))
        return planned

    def _plan_target(
        self, fqn: str, target: Any, target_set: PatternSet, saved: dict[str, _Saved | str],
        planned: _TargetPlans,
    ) -> None:
        """Add the reads of one target to ``planned`` (or note it missing); raises
        :class:`_Unloadable` when the checkpoint holds it in a form it cannot take."""
        items, used = planned.items, planned.used
        name = target_set.rename(fqn)
        target_set.note_stacked(name)
        if isinstance(saved.get(name), str):  # a non-tensor value
            if isinstance(target, torch.Tensor):
                raise _Unloadable(f"{fqn}: saved as a non-tensor value, target is a tensor")
            used.add(saved[name])
            items.append(_bytes_read(fqn, saved[name]))
            return
        if name in saved and not isinstance(target, torch.Tensor):
            raise _Unloadable(
                f"{fqn}: saved as a tensor of shape {tuple(saved[name].md.size)}, target is "
                f"{type(target).__name__}"
            )
        if not isinstance(target, torch.Tensor):
            planned.missing.append(fqn)
            return
        source = saved.get(name)
        if source is not None and not convertible(source.md.properties.dtype, _dtype(target)):
            raise _Unloadable(
                f"{fqn}: saved as {source.md.properties.dtype}, target is {_dtype(target)}: "
                "torch cannot convert between them (packed and bits dtypes load only as themselves)"
            )
        if sharded_tensor.is_sharded_tensor(target):
            if source is None:
                planned.missing.append(fqn)
                return
            self._plan_sharded_tensor(fqn, name, target, source, target_set, items)
            used.add(source.key)
            return
        dmap = dim_map_for(target_set.dim_pattern(name), fqn, target, target.shape)
        shape = logical_shape(target.shape, dmap)
        boxes: list[Box] = []
        for physical in tensor_boxes(fqn, target):
            logical, padding = map_box(physical, dmap)
            boxes.extend(logical)
            self._zero_padding(fqn, target, physical, padding, dmap)
        if source is not None:
            if source.logical_shape != shape:
                raise _Unloadable(f"{fqn}: shape mismatch: saved {source.logical_shape}, expected {shape}")
            used.add(source.key)
            ident = list(range(len(shape)))
            for b in boxes:
                items.extend(_box_requests(fqn, b.local_offsets, b.global_offsets, b.lengths, source, ident))
            return
        stacked = self._plan_stacked(fqn, name, shape, boxes, target_set, saved, used)
        if stacked is None:
            planned.missing.append(fqn)
        else:
            items.extend(stacked)

    @staticmethod
    def _plan_sharded_tensor(
        fqn: str, name: str, target: Any, source: _Saved, target_set: PatternSet, items: list
    ) -> None:
        """Requests filling every local shard of a ShardedTensor target from the saved tensor
        (each shard is an exact box)."""
        if target_set.dim_pattern(name) is not None or target_set.stacked(name) is not None:
            raise _Unloadable(f"{fqn}: layout patterns do not apply to ShardedTensor targets")
        shape = tuple(target.size())
        if source.logical_shape != shape:
            raise _Unloadable(f"{fqn}: shape mismatch: saved {source.logical_shape}, expected {shape}")
        ident = list(range(len(shape)))
        for box, _ in sharded_tensor.local_shards(fqn, target, loading=True):
            items.extend(_box_requests(
                fqn, box.local_offsets, box.global_offsets, box.lengths, source, ident, box.global_offsets
            ))

    def _plan_stacked(
        self,
        fqn: str,
        name: str,
        shape: tuple[int, ...],
        boxes: list[Box],
        target_set: PatternSet,
        saved: dict[str, _Saved | str],
        used: set[str],
    ) -> list[ReadItem] | None:
        """Reads for a per-item target from a saved stack, or a stacked target from saved
        items; ``None`` if no stacked pattern connects them (:class:`_Unloadable` if shapes
        disagree)."""
        hit = target_set.stacked_item(name)
        if hit is not None and isinstance(saved.get(hit[1]), _Saved):  # per-item target, stacked source
            p, stacked_key, i = hit
            source = saved[stacked_key]
            d = p.dim
            if len(source.logical_shape) <= d:  # a scalar state (``step``): every item shares it
                return self._plan_scalar(fqn, shape, boxes, source, used, p, target_set)
            expected = source.logical_shape[:d] + source.logical_shape[d + 1 :]
            if expected != shape or i >= source.logical_shape[d]:
                raise _Unloadable(f"{fqn}: item {i} of {source.key} {source.logical_shape} does not fit {shape}")
            target_set.mark_used(p)
            used.add(source.key)
            self._stack_dims[fqn] = d
            to_dest = [k if k < d else (None if k == d else k - 1) for k in range(len(shape) + 1)]
            items = []
            for b in boxes:
                src = b.global_offsets[:d] + (i,) + b.global_offsets[d:]
                lens = b.lengths[:d] + (1,) + b.lengths[d:]
                items.extend(_box_requests(fqn, b.local_offsets, src, lens, source, to_dest))
            return items
        p = target_set.stacked(name)
        if p is None:
            return None
        d = p.dim
        if len(shape) <= d:  # a scalar state (``step``): taken from item 0
            source = saved.get(p.item_key(name, 0))
            if not isinstance(source, _Saved):
                return None
            i = 1
            while isinstance(saved.get(p.item_key(name, i)), _Saved):  # the others: consumed too
                used.add(saved[p.item_key(name, i)].key)
                i += 1
            return self._plan_scalar(fqn, shape, boxes, source, used, p, target_set)
        sources = [saved.get(p.item_key(name, i)) for i in range(shape[d])]
        if not any(isinstance(s, _Saved) for s in sources):
            return None
        item_shape = shape[:d] + shape[d + 1 :]
        for i, source in enumerate(sources):
            if not isinstance(source, _Saved) or source.logical_shape != item_shape:
                got = source.logical_shape if isinstance(source, _Saved) else None
                raise _Unloadable(f"{fqn}: item {p.item_key(name, i)} is {got}, expected {item_shape}")
        target_set.mark_used(p)
        used.update(s.key for s in sources)  # the stacked target consumes every item, held here or not
        self._stack_dims[fqn] = d
        to_dest = [k if k < d else k + 1 for k in range(len(item_shape))]
        items = []
        for b in boxes:
            for i in range(b.global_offsets[d], b.global_offsets[d] + b.lengths[d]):
                source = sources[i]
                dest = list(b.local_offsets)
                dest[d] += i - b.global_offsets[d]
                src = b.global_offsets[:d] + b.global_offsets[d + 1 :]
                lens = b.lengths[:d] + b.lengths[d + 1 :]
                items.extend(_box_requests(fqn, tuple(dest), src, lens, source, to_dest))
        return items

    @staticmethod
    def _plan_scalar(fqn, shape, boxes, source: _Saved, used, p, target_set) -> list[ReadItem]:
        """Reads of a state with no stack dim (an optimizer ``step``) across the two forms."""
        if source.logical_shape != shape:
            raise _Unloadable(f"{fqn}: {source.key} is {source.logical_shape}, expected {shape}")
        target_set.mark_used(p)
        used.add(source.key)
        ident = list(range(len(shape)))
        items = []
        for b in boxes:
            items.extend(_box_requests(fqn, b.local_offsets, b.global_offsets, b.lengths, source, ident))
        return items

    def _zero_padding(self, fqn, target, physical: Box, padding, dmap: DimMap | None) -> None:
        """Padding rows of the target (no logical index) are zero after a load."""
        if not padding:
            return
        local = _compat.local_tensor(target).detach()
        d = dmap.dim
        for start, n in padding:
            region = narrow(local, physical.local_offsets, physical.lengths)
            region.narrow(d, start - physical.local_offsets[d], n).zero_()

    # -- data -----------------------------------------------------------------------------
    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        fqn, shard = read_item.dest_index.fqn, read_item.dest_index.offset
        view = self._views.get((fqn, shard))
        if view is None:
            target = self.state_dict[fqn]
            local = sharded_tensor.shard_data(target, shard) if shard is not None else _compat.local_tensor(target)
            view = self._views[(fqn, shard)] = local.detach()
        lengths = tuple(read_item.lengths)
        if len(read_item.dest_offsets) == len(lengths):
            return narrow(view, read_item.dest_offsets, lengths)
        d = self._stack_dims[fqn]  # stacked <-> per-item: source and target ranks differ
        if len(read_item.dest_offsets) < len(lengths):
            dest_lengths = lengths[:d] + lengths[d + 1 :]
        else:
            dest_lengths = lengths[:d] + (1,) + lengths[d:]
        return narrow(view, read_item.dest_offsets, dest_lengths).view(lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        value.seek(0)
        fqn = read_item.dest_index.fqn
        opt_in = "UCPLoadPlanner(allow_pickle=True)"
        self.load_value(read_item, load_torch_save(value, fqn, allow_pickle=self.allow_pickle, opt_in=opt_in))

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Place a decoded non-tensor value (torch_ucp readers decode without pickle)."""
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            _compat.set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            # self.state_dict may be a copy (sharded-tensor flattening); write the caller's dict
            self.original_state_dict[fqn] = value
            self.state_dict[fqn] = value


def _default_target_patterns(recorded: list[Any], saved_patterns: list[Any] | None) -> list[Pattern]:
    """The target's layout rules when ``patterns=`` is not given: those recorded at save time,
    else (a stock checkpoint) those of ``saved_patterns``, with fused degrees read from the
    target's own mesh (a degree describes the saver's tensors). Renames are left out: they map
    the saver's (or the stored) names, not this target's; a function is not even recorded."""
    out: list[Pattern] = []
    for p in as_patterns(recorded or saved_patterns):
        if isinstance(p, Rename):
            continue
        if isinstance(p, FusedParam):
            p = FusedParam(p.glob, p.parts, dim=p.dim, mesh_dim=p.mesh_dim)
        out.append(p)
    return out


def _dtype(target: torch.Tensor) -> torch.dtype:
    return sharded_tensor.dtype_of(target) if sharded_tensor.is_sharded_tensor(target) else target.dtype


def _bytes_read(fqn: str, key: str) -> ReadItem:
    return ReadItem(
        type=LoadItemType.BYTE_IO,
        dest_index=MetadataIndex(fqn),
        dest_offsets=torch.Size((0,)),
        storage_index=MetadataIndex(key),
        storage_offsets=torch.Size((0,)),
        lengths=torch.Size((0,)),
    )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


def _unreplicated_targets(state_dict: dict[str, Any]) -> dict[str, frozenset[int]]:
    """Target keys whose DTensor is replicated on no mesh dim of more than one rank, with their
    meshes' ranks (see :class:`~torch_ucp.planner.plan_table.RankLocalItems`)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, frozenset[int]] = {}
    ranks_of: dict[int, frozenset[int]] = {}  # one set per mesh
    for fqn, target in state_dict.items():
        if not isinstance(target, DTensor):
            continue
        mesh = target.device_mesh
        if any(p.is_replicate() or p.is_partial() for p, n in zip(target.placements, mesh.shape) if n > 1):
            continue
        ranks = ranks_of.get(id(mesh))
        if ranks is None:
            ranks = ranks_of[id(mesh)] = frozenset(mesh.mesh.flatten().tolist())
        out[fqn] = ranks
    return out


__all__ = ["UCPLoadPlanner"]
