"""The on-disk format of a torch_ucp checkpoint, as typed dataclasses.

A checkpoint is a folder (local path or object-store prefix) holding raw data objects and one
JSON metadata object, ``.metadata``, written last. docs/FORMAT.md mirrors this module field by
field; :mod:`torch_ucp.metadata.codec` turns it into JSON and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_NAME = "torch_ucp"
FORMAT_VERSION = 1
METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class MeshInfo:
    """The DeviceMesh a tensor was saved from.

    Attributes:
        shape: size of every mesh dimension, e.g. ``(2, 2)``.
        dim_names: the mesh dimension names, e.g. ``("dp", "tp")``, or ``None``.
    """

    shape: tuple[int, ...]
    dim_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PlacementInfo:
    """One DTensor placement, per mesh dimension.

    Attributes:
        kind: ``"shard"``, ``"strided_shard"``, ``"replicate"`` or ``"partial"``.
        dim: the sharded tensor dimension (shard kinds only).
        split_factor: ``_StridedShard``'s split factor (``strided_shard`` only).
    """

    kind: str
    dim: int | None = None
    split_factor: int | None = None

    def __str__(self) -> str:
        if self.kind == "shard":
            return f"Shard({self.dim})"
        if self.kind == "strided_shard":
            return f"_StridedShard({self.dim}, sf={self.split_factor})"
        return {"replicate": "Replicate()", "partial": "Partial()"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class StoredBytes:
    """Where a run of bytes lives: ``object`` (path relative to the checkpoint root),
    ``byte_offset`` and ``byte_length`` inside it, and one crc32 per ``block_bytes`` block."""

    object: str
    byte_offset: int
    byte_length: int
    checksums: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fragment:
    """An atomic piece of a logical tensor: a box, stored as C-contiguous little-endian bytes.

    Attributes:
        offsets: where the box starts in the logical tensor, per dimension.
        lengths: the box's extent per dimension (its shape).
        data: the bytes of the box, ``prod(lengths) * itemsize`` long.
        rank: the global rank that wrote it.
        coordinate: that rank's coordinate in the tensor's mesh (``None`` for plain tensors).
    """

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    data: StoredBytes
    rank: int | None = None
    coordinate: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)


@dataclass
class TensorEntry:
    """A logical tensor: its FQN, dtype, global shape and the fragments that tile it.

    Attributes:
        fqn: flattened state-dict key.
        dtype: element type of the stored bytes.
        shape: the logical (global, unsharded) shape.
        fragments: disjoint boxes covering the whole tensor.
        mesh: index into :attr:`CheckpointMetadata.meshes`, ``None`` for a plain tensor.
        placements: the DTensor placements at save time, ``None`` for a plain tensor.
    """

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fragments: list[Fragment]
    mesh: int | None = None
    placements: tuple[PlacementInfo, ...] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ObjectEntry:
    """A non-tensor value (int, str, bytes, a small object from a Stateful).

    Attributes:
        fqn: flattened state-dict key.
        encoding: ``"json"`` (UTF-8 JSON), ``"raw"`` (a ``bytes`` value) or ``"torch_save"``
            (``torch.save`` framing, only for values JSON cannot represent).
        data: where the encoded bytes live.
        rank: the global rank that wrote it.
    """

    fqn: str
    encoding: str
    data: StoredBytes
    rank: int | None = None


@dataclass
class CheckpointMetadata:
    """Everything needed to load a checkpoint into any layout, without a process group.

    Attributes:
        save_id: identifies the save that wrote the data objects (they live under
            ``data-<save_id>/``).
        world_size: ranks that took part in the save.
        tensors / objects: entries keyed by FQN.
        meshes: the DeviceMeshes referenced by tensor entries.
        flatten_mapping: flattened FQN -> path in the nested state dict (DCP's mapping).
        checksum_algorithm / checksum_block_bytes: how fragment checksums were computed.
        checksum_block_width: block width along a row (:class:`~torch_ucp.storage.checksum.
            BlockGrid`); ``None`` in version-1 checkpoints, whose blocks are flat.
        patterns: layout rules recorded at save time (see docs/PATTERNS.md).
        torch_version / created: provenance.
        version: the format version this metadata was written with.
    """

    save_id: str
    world_size: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    objects: dict[str, ObjectEntry] = field(default_factory=dict)
    meshes: list[MeshInfo] = field(default_factory=list)
    flatten_mapping: dict[str, list[Any]] = field(default_factory=dict)
    checksum_algorithm: str = "crc32"
    checksum_block_bytes: int = 1 << 20
    checksum_block_width: int | None = None
    patterns: list[dict[str, Any]] = field(default_factory=list)
    torch_version: str = ""
    created: float = 0.0
    version: int = FORMAT_VERSION

    def data_objects(self) -> set[str]:
        """Every data object the checkpoint references."""
        names = {f.data.object for t in self.tensors.values() for f in t.fragments}
        names.update(o.data.object for o in self.objects.values())
        return names

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
