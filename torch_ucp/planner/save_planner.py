"""UCPSavePlanner: DTensor placements -> atomic fragments, replicated data written once."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _create_write_item_for_bytesio,
    _create_write_items,
)
from torch.distributed.tensor import DTensor

from torch_ucp.metadata.codec import placement_to_json
from torch_ucp.patterns.engine import PatternError, PatternSet, dim_map_for, logical_shape, map_box
from torch_ucp.planner.layout import (
    Box,
    dtensor_boxes,
    local_tensor,
    mesh_info,
    placement_info,
    whole_box,
)
from torch_ucp.planner.provenance import UCP_KEY, SaveInfo


def narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """View of ``t`` restricted to the box ``offsets``/``lengths``."""
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != t.shape[dim]:
            t = t.narrow(dim, o, n)
    return t


def write_item_nbytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return item.bytes_io_data.nbytes if item.bytes_io_data is not None else 0
    return math.prod(item.tensor_data.chunk.sizes) * torch._utils._element_size(
        item.tensor_data.properties.dtype
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
        self._names: dict[str, str] = {}
        self._local_of: dict[str, str] = {}

    # -- local planning -------------------------------------------------------------------
    def _tensor_items(self, fqn: str, name: str, obj: torch.Tensor) -> list[WriteItem]:
        """Write items of local tensor ``fqn`` stored as ``name`` (after renames), one per exact
        box of the logical tensor (boxes mapped through a fused/padded pattern if one applies)."""
        if obj.device.type == "meta":
            raise ValueError(f"{fqn}: cannot save a tensor on the meta device")
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
        items = []
        for physical in boxes:
            for box in map_box(physical, dmap)[0]:
                index = MetadataIndex(name, box.global_offsets)
                self._boxes[index] = (fqn, box)
                chunk = ChunkStorageMetadata(torch.Size(box.global_offsets), torch.Size(box.lengths))
                items.append(
                    WriteItem(
                        index=index,
                        type=kind,
                        tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size),
                    )
                )
        return items

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        layouts: dict[str, dict[str, Any]] = {}
        names = {fqn: self.patterns.rename(fqn) for fqn in self.state_dict}
        if len(set(names.values())) != len(names):
            clash = sorted(fqn for fqn in names if list(names.values()).count(names[fqn]) > 1)
            raise PatternError(f"renames map several keys to one name: {clash[:10]}")
        self._names = names
        self._local_of = {name: fqn for fqn, name in names.items()}
        for fqn, obj in self.state_dict.items():
            name = names[fqn]
            self.patterns.note_stacked(name)
            if isinstance(obj, torch.Tensor) and not hasattr(obj, "__create_write_items__"):
                items.extend(self._tensor_items(fqn, name, obj))
            elif isinstance(obj, DTensor):
                items.extend(self._tensor_items(fqn, name, obj))
                mesh = mesh_info(obj)
                layouts[name] = {
                    "mesh": {"shape": list(mesh.shape), "dim_names": mesh.dim_names},
                    "placements": [placement_to_json(placement_info(p)) for p in obj.placements],
                    "coordinate": obj.device_mesh.get_coordinate(),
                }
            elif isinstance(obj, torch.Tensor) or hasattr(obj, "__create_write_items__"):
                items.extend(_create_write_items(fqn, obj))  # ShardedTensor and friends
            else:
                items.append(_create_write_item_for_bytesio(name, obj))
        self.patterns.check_used("the state dict being saved")
        mappings = {names.get(k, k): v for k, v in self.mappings.items()}
        self.plan = SavePlan(items, planner_data={"mappings": mappings, "layouts": layouts})
        return self.plan

    # -- global planning (coordinator) ------------------------------------------------------
    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        writer_of = _assign_writers(all_plans)
        new_plans = [
            dataclasses.replace(
                plan,
                items=[item for item in plan.items if writer_of[item.index] == rank],
                planner_data=None,
            )
            for rank, plan in enumerate(all_plans)
        ]
        metadata = _build_metadata(all_plans, writer_of, self.patterns.to_json())
        self.global_plan, self.metadata = new_plans, metadata
        return new_plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    # -- data -----------------------------------------------------------------------------
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | Any:
        found = self._boxes.get(write_item.index)
        if found is None:
            if write_item.type == WriteItemType.BYTE_IO:
                return self.transform_object(write_item, self.resolve_object(write_item))
            return super().resolve_data(write_item)
        fqn, box = found
        t = local_tensor(self.state_dict[fqn]).detach()
        return narrow(t, box.local_offsets, box.lengths)

    def resolve_object(self, write_item: WriteItem) -> Any:
        """The raw value of a BYTE_IO item, for writers that encode values without pickle."""
        name = write_item.index.fqn
        return self.state_dict[self._local_of.get(name, name)]


def _assign_writers(all_plans: list[SavePlan]) -> dict[MetadataIndex, int]:
    """Pick one writer per unique item: sole holders keep theirs; replicated items go, largest
    first, to the holder with the fewest bytes assigned so far. Linear in the number of items
    plus ``n log n`` in the replicated ones."""
    holders: dict[MetadataIndex, list[int]] = {}
    size: dict[MetadataIndex, int] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            ranks = holders.get(item.index)
            if ranks is None:
                holders[item.index] = [rank]
                size[item.index] = write_item_nbytes(item)
            else:
                ranks.append(rank)
    load = [0] * len(all_plans)
    writer_of: dict[MetadataIndex, int] = {}
    shared = []
    for index, ranks in holders.items():
        if len(ranks) == 1:
            writer_of[index] = ranks[0]
            load[ranks[0]] += size[index]
        else:
            shared.append(index)
    shared.sort(key=lambda i: -size[i])
    for index in shared:
        rank = min(holders[index], key=lambda r: load[r])
        writer_of[index] = rank
        load[rank] += size[index]
    return writer_of


def _build_metadata(
    all_plans: list[SavePlan], writer_of: dict[MetadataIndex, int], patterns: list[Any]
) -> Metadata:
    state_dict_metadata: dict[str, Any] = {}
    first_item: dict[str, tuple[int, WriteItem]] = {}
    chunks: dict[str, dict[tuple[int, ...], tuple[ChunkStorageMetadata, int]]] = {}
    mappings: dict[str, Any] = {}
    info = SaveInfo(patterns=list(patterns))
    mesh_ids: dict[str, int] = {}
    coordinates: dict[tuple[str, int], list[int]] = {}

    for rank, plan in enumerate(all_plans):
        pdata = plan.planner_data or {}
        mappings.update(pdata.get("mappings", {}) if isinstance(pdata, dict) else {})
        for fqn, layout in (pdata.get("layouts", {}) if isinstance(pdata, dict) else {}).items():
            coordinates[(fqn, rank)] = layout["coordinate"]
            if fqn not in info.tensors:
                key = repr(layout["mesh"])
                if key not in mesh_ids:
                    mesh_ids[key] = len(info.meshes)
                    info.meshes.append(layout["mesh"])
                info.tensors[fqn] = {"mesh": mesh_ids[key], "placements": layout["placements"]}
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                state_dict_metadata[fqn] = BytesStorageMetadata()
                continue
            td = item.tensor_data
            seen = first_item.get(fqn)
            if seen is None:
                first_item[fqn] = (rank, item)
                chunks[fqn] = {}
            else:
                other_rank, other = seen
                o = other.tensor_data
                if o.size != td.size or o.properties.dtype != td.properties.dtype:
                    raise ValueError(
                        f"{fqn}: ranks disagree on the tensor: rank {other_rank} has global shape "
                        f"{tuple(o.size)} dtype {o.properties.dtype}, rank {rank} has "
                        f"{tuple(td.size)} dtype {td.properties.dtype}"
                    )
            key = tuple(td.chunk.offsets)
            if key not in chunks[fqn]:
                chunks[fqn][key] = (td.chunk, writer_of[item.index])

    for fqn, (_, item) in first_item.items():
        td = item.tensor_data
        ordered = sorted(chunks[fqn].items())
        covered = sum(math.prod(c.sizes) for _, (c, _) in ordered)
        if covered != math.prod(td.size) and math.prod(td.size) != 0:
            raise ValueError(
                f"{fqn}: fragments cover {covered} of {math.prod(td.size)} elements of a tensor "
                f"of shape {tuple(td.size)}; the sharding cannot be described exactly"
            )
        state_dict_metadata[fqn] = TensorStorageMetadata(
            properties=td.properties,
            size=td.size,
            chunks=[c for _, (c, _) in ordered],
        )
        if fqn in info.tensors:
            info.tensors[fqn]["sources"] = [
                [rank, coordinates.get((fqn, rank))] for _, (_, rank) in ordered
            ]
        else:
            info.tensors[fqn] = {"sources": [[rank, None] for _, (_, rank) in ordered]}
    planner_data = dict(mappings)
    planner_data[UCP_KEY] = info.to_json()
    return Metadata(state_dict_metadata=state_dict_metadata, planner_data=planner_data)
