"""UCPSavePlanner: DTensor placements -> atomic fragments, replicated data written once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.tensor import DTensor

from torch_ucp import _compat
from torch_ucp.errors import PatternError, SavePlanError
from torch_ucp.metadata.dtypes import name_to_dtype
from torch_ucp.metadata.placements import mesh_info, narrow, whole_box
from torch_ucp.metadata.provenance import PlannerData
from torch_ucp.metadata.schema import DimMap, SaveLayout, TensorEntry
from torch_ucp.patterns.engine import PatternSet, dim_map_for, logical_shape, map_box
from torch_ucp.planner import sharded_tensor
from torch_ucp.planner.global_plan import GlobalPlan, StateDictMetadata, plan_globally
from torch_ucp.planner.layout import Box, dtensor_boxes, placements_of
from torch_ucp.planner.plan_table import (
    BYTES,
    SHARDED,
    LocalPlanTable,
    LocalTableBuilder,
    RankLocalItems,
    WriterAssignment,
)


class UCPSavePlanner(DefaultSavePlanner):
    """A :class:`DefaultSavePlanner` that describes every tensor as exact atomic fragments.

    Every DTensor placement (``Shard``, ``Replicate``, ``_StridedShard``, uneven shards) becomes
    one write item per exact box of the logical tensor that the rank holds, so a layout whose
    local rows are not contiguous in the global tensor gets several boxes, never a wrong one.
    Replicated fragments are written once, each by the holder with the fewest bytes so far.
    It also records, per fragment, the writer's rank and mesh coordinate and, per tensor, the
    mesh and placements.

    Works with :class:`torch_ucp.UCPWriter` and with DCP's stock writers: with a stock writer the
    checkpoint stays loadable by stock ``dcp.load``, and carries torch_ucp's metadata as a JSON
    string inside ``Metadata.planner_data``.

    Args:
        patterns: layout rules (see :mod:`torch_ucp.patterns`) recorded in the metadata.
        flatten_state_dict: flatten nested dicts/lists into dotted FQNs (DCP's default).
        flatten_sharded_tensors: DCP's 2-D ShardedTensor flattening.
    """

    def __init__(
        self,
        *,
        patterns: Sequence[Any] | None = None,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
    ) -> None:
        super().__init__(
            flatten_state_dict=flatten_state_dict, flatten_sharded_tensors=flatten_sharded_tensors
        )
        self.patterns = PatternSet(patterns)
        self._boxes: dict[MetadataIndex, tuple[str, Box]] = {}

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        self._boxes = {}
        self._shard_data: dict[MetadataIndex, torch.Tensor] = {}  # ShardedTensor local shards
        self._names: dict[str, str] = {}
        self._local_of: dict[str, str] = {}

    # -- local planning -------------------------------------------------------------------
    def _tensor_items(
        self, fqn: str, name: str, obj: torch.Tensor
    ) -> tuple[torch.Size, DimMap | None, list[WriteItem]]:
        """The logical size of tensor ``fqn`` stored as ``name`` (after renames), the pattern's
        index map if one applies, and its write items: one per exact box of the logical tensor
        this rank holds (boxes mapped through a fused/padded pattern if one applies)."""
        if obj.device.type == "meta":
            raise SavePlanError(f"{fqn}: cannot save a tensor on the meta device")
        if isinstance(obj, DTensor):
            boxes = dtensor_boxes(fqn, obj)
            kind = WriteItemType.SHARD
        else:
            boxes = [whole_box(obj.shape)]
            kind = WriteItemType.TENSOR
        if obj.numel() == 0:  # record the empty tensor once; dedup keeps one copy
            boxes = [whole_box(obj.shape)]
        dmap = dim_map_for(self.patterns.dim_pattern(name), name, obj, obj.shape)
        size = torch.Size(logical_shape(obj.shape, dmap))
        props = TensorProperties(dtype=obj.dtype)
        items = [
            self._write_item(fqn, name, box, kind, props, size)
            for physical in boxes
            for box in map_box(physical, dmap)[0]
        ]
        return size, dmap, items

    def _write_item(
        self, fqn: str, name: str, box: Box, kind: WriteItemType, props: TensorProperties, size: torch.Size
    ) -> WriteItem:
        """The write item of one exact box of tensor ``fqn`` (stored as ``name``)."""
        index = MetadataIndex(name, box.global_offsets)
        self._boxes[index] = (fqn, box)
        chunk = ChunkStorageMetadata(torch.Size(box.global_offsets), torch.Size(box.lengths))
        return WriteItem(index=index, type=kind, tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size))

    def _sharded_tensor_items(self, fqn: str, name: str, st: Any, table: LocalTableBuilder) -> list[WriteItem]:
        """A ShardedTensor's write items (one per local shard) and its catalog entry, with the
        layout where a 1-D mesh describes it (:mod:`~torch_ucp.planner.sharded_tensor`)."""
        if self.patterns.dim_pattern(name) is not None:
            raise PatternError(f"{fqn}: layout patterns do not apply to ShardedTensors")
        layout = -1
        found = sharded_tensor.chunk_layout(st)
        if found is not None:
            layout = table.add_layout(found.mesh, found.placements, found.coordinate)
        size, dtype = torch.Size(st.size()), sharded_tensor.dtype_of(st)
        table.add_tensor(name, dtype, size, layout, self.mappings.get(fqn), kind=SHARDED)
        props = TensorProperties(dtype=dtype)
        items = []
        for box, data in sharded_tensor.local_shards(fqn, st):
            items.append(self._write_item(fqn, name, box, WriteItemType.SHARD, props, size))
            self._shard_data[items[-1].index] = data
        if math.prod(size) == 0:  # an empty tensor is recorded once, like a plain one
            items.append(self._write_item(fqn, name, whole_box(size), WriteItemType.SHARD, props, size))
            self._shard_data[items[-1].index] = torch.empty(size, dtype=dtype)
        return items

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        table = LocalTableBuilder()
        layout_of: dict[str, int] = {}
        names = {fqn: self.patterns.rename(fqn) for fqn in self.state_dict}
        if len(set(names.values())) != len(names):
            clash = sorted(fqn for fqn in names if list(names.values()).count(names[fqn]) > 1)
            raise PatternError(f"renames map several keys to one name: {clash[:10]}")
        self._names = names
        self._local_of = {name: fqn for fqn, name in names.items()}
        for fqn, obj in self.state_dict.items():
            name = names[fqn]
            self.patterns.note_stacked(name)
            if sharded_tensor.is_sharded_tensor(obj):
                items.extend(self._sharded_tensor_items(fqn, name, obj, table))
            elif isinstance(obj, DTensor) or (
                isinstance(obj, torch.Tensor) and not hasattr(obj, "__create_write_items__")
            ):
                layout = -1
                if isinstance(obj, DTensor):
                    layout = layout_of[name] = table.add_layout(
                        mesh_info(obj.device_mesh), placements_of(obj), obj.device_mesh.get_coordinate()
                    )
                size, dmap, tensor_items = self._tensor_items(fqn, name, obj)
                table.add_tensor(name, obj.dtype, size, layout, self.mappings.get(fqn), dmap)
                items.extend(tensor_items)
            elif isinstance(obj, torch.Tensor) or hasattr(obj, "__create_write_items__"):
                items.extend(_compat.create_write_items(fqn, obj))  # other checkpointable tensors
            else:
                items.append(_compat.create_write_item_for_bytes(name, obj))
        self.patterns.check_used("the state dict being saved")
        paths = {names.get(k, k): v for k, v in self.mappings.items()}
        self.plan = SavePlan(
            RankLocalItems(items), planner_data=table.build(items, layout_of, paths)
        )
        return self.plan

    # -- global planning (coordinator) ------------------------------------------------------
    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        tables = [
            plan.planner_data
            if isinstance(plan.planner_data, LocalPlanTable)
            else LocalTableBuilder().build(plan.items, {}, {})  # a plan from another planner
            for plan in all_plans
        ]
        planned = plan_globally(tables)
        new_plans = [
            dataclasses.replace(plan, items=[], planner_data=assignment)
            for plan, assignment in zip(all_plans, planned.assignments)
        ]
        layout = save_layout(planned, self.patterns.to_json())
        mapping = {k.name: tuple(k.path) for k in planned.fragments.keys if k.path is not None}
        metadata = Metadata(
            state_dict_metadata=StateDictMetadata(planned.fragments),
            planner_data=PlannerData(mapping, layout, partial(_chunk_writers, planned)),
        )
        self.global_plan, self.metadata = new_plans, metadata
        return new_plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """This rank's final plan: the local items the coordinator assigned to it."""
        if isinstance(new_plan.planner_data, WriterAssignment):
            items = new_plan.planner_data.select(self.plan.items)
            new_plan = dataclasses.replace(new_plan, items=items, planner_data=None)
        self.plan = new_plan
        return new_plan

    # -- data -----------------------------------------------------------------------------
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | Any:
        found = self._boxes.get(write_item.index)
        if found is None:
            if write_item.type == WriteItemType.BYTE_IO:
                return self.transform_object(write_item, self.resolve_value(write_item))
            return super().resolve_data(write_item)
        shard = self._shard_data.get(write_item.index)
        if shard is not None:
            return shard.detach()
        fqn, box = found
        t = _compat.local_tensor(self.state_dict[fqn]).detach()
        return narrow(t, box.local_offsets, box.lengths)

    def resolve_value(self, write_item: WriteItem) -> Any:
        """The raw value of a BYTE_IO item, for writers that encode values without pickle."""
        name = write_item.index.fqn
        return self.state_dict[self._local_of.get(name, name)]


def _chunk_writers(plan: GlobalPlan) -> dict[str, list[int]]:
    """The writer rank of every fragment of each tensor, in DCP's chunk order."""
    return {
        k.name: plan.fragments.writer[plan.fragments.rows(i)].tolist()
        for i, k in enumerate(plan.fragments.keys)
        if k.kind != BYTES
    }


def save_layout(planned: GlobalPlan, patterns: list[Any]) -> SaveLayout:
    """The typed layout of a save: every tensor with its mesh, placements, pattern map, fragment
    count and (where the routing rule does not give them) its writers."""
    layout = SaveLayout(patterns=list(patterns))
    fragments = planned.fragments
    mesh_ids: dict[int, int] = {}
    for k, key in enumerate(fragments.keys):
        if key.path is not None:
            layout.flatten_mapping[key.name] = list(key.path)
        if key.kind == BYTES:
            continue
        mesh = placements = None
        if key.layout >= 0:
            found = planned.layouts[key.layout]
            if key.layout not in mesh_ids:
                mesh_ids[key.layout] = layout.mesh_id(found.mesh)
            mesh, placements = mesh_ids[key.layout], found.placements
        rows = fragments.rows(k)
        layout.tensors[key.name] = TensorEntry(
            fqn=key.name,
            dtype=name_to_dtype(key.dtype),
            shape=tuple(key.shape),
            fragments=rows.stop - rows.start,
            mesh=mesh,
            placements=placements,
            dim_map=key.dim_map,
            writers=None if key.derived else tuple(planned.key_writers(k).tolist()),
            saved_as=sharded_tensor.SAVED_AS if key.kind == SHARDED else None,
        )
    return layout
