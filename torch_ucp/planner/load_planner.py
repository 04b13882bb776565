"""UCPLoadPlanner: plan every target tensor, of any placement, against the saved fragments."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from torch_ucp.errors import LoadPlanError
from torch_ucp.planner.boxes import BoxIndex, intersect
from torch_ucp.planner.layout import Box, local_tensor, tensor_boxes
from torch_ucp.planner.save_planner import narrow

_MAX_LISTED = 20


def plan_tensor_reads(
    fqn: str, saved: TensorStorageMetadata, targets: list[Box], index: BoxIndex | None = None
) -> list[ReadItem]:
    """Read items copying every part of the target boxes from the saved chunks that hold it."""
    ndim = len(saved.size)
    if index is None:
        index = BoxIndex([c.offsets for c in saved.chunks], [c.sizes for c in saved.chunks], ndim)
    items = []
    for box in targets:
        for i in index.overlapping(box.global_offsets, box.lengths):
            chunk = saved.chunks[i]
            hit = intersect(box.global_offsets, box.lengths, chunk.offsets, chunk.sizes)
            if hit is None:
                continue
            off, lengths = hit
            items.append(
                ReadItem(
                    type=LoadItemType.TENSOR,
                    dest_index=MetadataIndex(fqn, box.global_offsets),
                    dest_offsets=torch.Size(
                        lo + o - g for lo, o, g in zip(box.local_offsets, off, box.global_offsets)
                    ),
                    storage_index=MetadataIndex(fqn, chunk.offsets, i),
                    storage_offsets=torch.Size(o - c for o, c in zip(off, chunk.offsets)),
                    lengths=torch.Size(lengths),
                )
            )
    return items


class UCPLoadPlanner(DefaultLoadPlanner):
    """Loads a checkpoint into any layout: DTensors of any placement on any mesh, or plain tensors.

    Every target tensor is described by the exact boxes this rank holds; each box is planned
    against the saved fragments (torch_ucp checkpoints) or chunks (stock DCP checkpoints), so
    each rank reads exactly the bytes it needs.

    Args:
        allow_partial_load: load a subset: keys of the target missing from the checkpoint are
            left untouched and keys of the checkpoint absent from the target are ignored.
            Otherwise either raises :class:`~torch_ucp.errors.LoadPlanError` naming the keys.
        patterns: layout rules (see :mod:`torch_ucp.patterns`).
        flatten_state_dict / flatten_sharded_tensors: as in DCP's :class:`DefaultLoadPlanner`.

    A dtype change is allowed: the saved values are cast into the target's dtype.
    """

    def __init__(
        self,
        *,
        allow_partial_load: bool = False,
        patterns: list[Any] | None = None,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
    ) -> None:
        super().__init__(
            flatten_state_dict=flatten_state_dict,
            flatten_sharded_tensors=flatten_sharded_tensors,
            allow_partial_load=allow_partial_load,
        )
        self.patterns = list(patterns or [])

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self._views: dict[str, torch.Tensor] = {}

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise LoadPlanError("UCPLoadPlanner needs checkpoint metadata")
        saved = self.metadata.state_dict_metadata
        checkpoint = getattr(self.metadata.storage_meta, "checkpoint_id", None) or "checkpoint"
        items: list[ReadItem] = []
        problems: list[str] = []
        missing = [fqn for fqn in self.state_dict if fqn not in saved]
        if missing and not self.allow_partial_load:
            problems.append(f"missing from {checkpoint}: {_listing(missing)}")
        unexpected = [fqn for fqn in saved if fqn not in self.state_dict]
        if unexpected and not self.allow_partial_load:
            problems.append(
                f"in {checkpoint} but not in the target state dict: {_listing(unexpected)}"
            )
        for fqn, target in self.state_dict.items():
            md = saved.get(fqn)
            if md is None:
                continue
            if isinstance(md, BytesStorageMetadata):
                if isinstance(target, torch.Tensor):
                    problems.append(f"{fqn}: saved as a non-tensor value, target is a tensor")
                    continue
                index = MetadataIndex(fqn)
                items.append(
                    ReadItem(
                        type=LoadItemType.BYTE_IO,
                        dest_index=index,
                        dest_offsets=torch.Size((0,)),
                        storage_index=index,
                        storage_offsets=torch.Size((0,)),
                        lengths=torch.Size((0,)),
                    )
                )
                continue
            if not isinstance(target, torch.Tensor):
                problems.append(
                    f"{fqn}: saved as a tensor of shape {tuple(md.size)}, target is "
                    f"{type(target).__name__}"
                )
                continue
            if tuple(target.shape) != tuple(md.size):
                problems.append(
                    f"{fqn}: shape mismatch: saved {tuple(md.size)}, expected {tuple(target.shape)}"
                )
                continue
            items.extend(plan_tensor_reads(fqn, md, tensor_boxes(fqn, target)))
        if problems:
            raise LoadPlanError(
                f"cannot load {checkpoint} into this state dict:\n  " + "\n  ".join(problems)
            )
        self.plan = LoadPlan(items)
        return self.plan

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        fqn = read_item.dest_index.fqn
        view = self._views.get(fqn)
        if view is None:
            view = self._views[fqn] = local_tensor(self.state_dict[fqn]).detach()
        return narrow(view, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_object(self, read_item: ReadItem, value: Any) -> None:
        """Place a decoded non-tensor value (torch_ucp readers decode without pickle)."""
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            # self.state_dict may be a copy (sharded-tensor flattening); write the caller's dict
            self.original_state_dict[fqn] = value
            self.state_dict[fqn] = value


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


def target_nbytes(t: torch.Tensor) -> int:
    return math.prod(local_tensor(t).shape) * t.element_size()


__all__ = ["UCPLoadPlanner", "plan_tensor_reads"]
