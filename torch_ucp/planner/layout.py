"""Where a rank's local data sits in the logical tensor (the torch side of the index arithmetic
in :mod:`torch_ucp.metadata.placements`)."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from torch_ucp import _compat
from torch_ucp.errors import SavePlanError
from torch_ucp.metadata.placements import Box, boxes_for, placement_info, whole_box
from torch_ucp.metadata.schema import PlacementInfo


def placements_of(t: DTensor) -> tuple[PlacementInfo, ...]:
    return tuple(placement_info(p) for p in t.placements)


def dtensor_boxes(fqn: str, t: DTensor) -> list[Box]:
    """Boxes of ``t``'s local tensor on this rank, checked against the real local shape."""
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the mesh
        return []
    try:
        boxes = boxes_for(t.shape, mesh.shape, placements_of(t), coordinate)
    except ValueError as e:
        raise SavePlanError(f"{fqn}: {e}") from None
    local = _compat.local_tensor(t)
    if math.prod(local.shape) != sum(b.numel for b in boxes):
        raise SavePlanError(
            f"{fqn}: cannot describe DTensor local shard exactly: placements "
            f"{t.placements} on mesh {tuple(mesh.shape)} at {tuple(coordinate)} imply "
            f"{sum(b.numel for b in boxes)} elements, local tensor has shape {tuple(local.shape)}"
        )
    return boxes


def tensor_boxes(fqn: str, t: torch.Tensor) -> list[Box]:
    """Boxes a target or source tensor holds: exact DTensor boxes, or the whole plain tensor."""
    if isinstance(t, DTensor):
        return dtensor_boxes(fqn, t)
    if t.numel() == 0:
        return []
    return [whole_box(t.shape)]


