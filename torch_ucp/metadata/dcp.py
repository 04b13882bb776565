"""Bridge from torch_ucp metadata to DCP's :class:`Metadata`, so DCP's load flow can plan on it."""

from __future__ import annotations

import json

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from torch_ucp.metadata.codec import placement_to_json
from torch_ucp.metadata.schema import CheckpointMetadata, Fragment, ObjectEntry, TensorEntry
from torch_ucp.planner.provenance import UCP_KEY


def to_dcp_metadata(meta: CheckpointMetadata, checkpoint_id: str) -> Metadata:
    """DCP metadata whose chunks are the fragments and whose ``storage_data`` maps each chunk's
    :class:`MetadataIndex` to its :class:`TensorEntry` and :class:`Fragment` (or the value's
    :class:`ObjectEntry`)."""
    sd_meta: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, tuple[TensorEntry, Fragment] | ObjectEntry] = {}
    for fqn, t in meta.tensors.items():
        sd_meta[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=t.dtype),
            size=torch.Size(t.shape),
            chunks=[
                ChunkStorageMetadata(torch.Size(f.offsets), torch.Size(f.lengths))
                for f in t.fragments
            ],
        )
        for f in t.fragments:
            storage[MetadataIndex(fqn, f.offsets)] = (t, f)
    for fqn, o in meta.objects.items():
        sd_meta[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = o
    planner_data: dict[str, object] = {k: tuple(v) for k, v in meta.flatten_mapping.items()}
    planner_data[UCP_KEY] = json.dumps(
        {
            "meshes": [
                {"shape": list(m.shape), "dim_names": list(m.dim_names) if m.dim_names else None}
                for m in meta.meshes
            ],
            "tensors": {
                fqn: {
                    "mesh": t.mesh,
                    "placements": [placement_to_json(p) for p in t.placements or ()],
                }
                for fqn, t in meta.tensors.items()
                if t.mesh is not None
            },
            "patterns": meta.patterns,
        }
    )
    return Metadata(
        state_dict_metadata=sd_meta,
        planner_data=planner_data,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=meta.save_id),
    )
