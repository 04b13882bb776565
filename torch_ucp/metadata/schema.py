"""The on-disk format of a torch_ucp checkpoint, as typed dataclasses.

A checkpoint is a folder (local path or object-store prefix) holding raw data objects, one
binary fragment index per writer rank, and one JSON header, ``.metadata``, written last (the
commit point). docs/FORMAT.md mirrors this module field by field:
:mod:`~torch_ucp.metadata.header` encodes the header, :mod:`~torch_ucp.metadata.index` the
fragment indexes, :mod:`~torch_ucp.metadata.fragments` holds fragment rows as columns.

The same types describe what a save planner decides (:class:`SaveLayout`), what the writer
commits (:class:`CheckpointMetadata`) and what a reader loads, so the layout of a save has one
shape from planner to disk.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "torch_ucp"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_FILE = ".metadata"
DATA_PREFIX = "data-"
ITEM_ALIGNMENT = 64
"""Bytes; every fragment and value in a data object starts at a multiple of this."""
DEFAULT_CHECKSUM = "crc32c"
ROTATE_MIN_BYTES = 4096
V1_CHECKSUM_BLOCK_BYTES = 1 << 20  # version-1 metadata may omit the block size: it was this
"""Replicated DTensor fragments of tensors with fewer bytes per shard are all written by replica
0 (see :mod:`torch_ucp.metadata.routing`); larger ones rotate over the replicas."""


@dataclass(frozen=True)
class MeshInfo:
    """The DeviceMesh a tensor was saved from.

    Attributes:
        shape: size of every mesh dimension, e.g. ``(2, 2)``.
        dim_names: the mesh dimension names, e.g. ``("dp", "tp")``, or ``None``.
        ranks: the global rank at every mesh coordinate, in C order (``DeviceMesh.mesh``
            flattened), or ``None`` where unknown (version 1, tools that record a layout for
            information only).
    """

    shape: tuple[int, ...]
    dim_names: tuple[str, ...] | None = None
    ranks: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def rank_array(self) -> np.ndarray:
        """:attr:`ranks` as an int64 array (computed once)."""
        assert self.ranks is not None
        return np.asarray(self.ranks, dtype=np.int64)

    def __str__(self) -> str:
        if self.dim_names:
            return "mesh(" + ", ".join(f"{n}={s}" for n, s in zip(self.dim_names, self.shape)) + ")"
        return f"mesh{list(self.shape)}"


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
class Segment:
    """``length`` indices starting at ``physical`` in the tensor a rank saw (the DTensor's
    global view) are the indices starting at ``logical`` in the stored logical tensor."""

    physical: int
    logical: int
    length: int


@dataclass(frozen=True)
class DimMap:
    """A piecewise-contiguous index map along one tensor dimension (a fused, interleaved or
    padded parameter, see docs/PATTERNS.md).

    Physical indices not covered by any segment (vocabulary padding) map nowhere: they are not
    saved and are zero-filled on load.
    """

    dim: int
    physical_size: int
    logical_size: int
    segments: tuple[Segment, ...]

    def to_logical(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """``(logical_start, length, physical_start)`` runs of the physical range."""
        return self._map(start, length, lambda s: (s.physical, s.logical))

    def to_physical(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """``(physical_start, length, logical_start)`` runs of the logical range."""
        return self._map(start, length, lambda s: (s.logical, s.physical))

    def _map(self, start: int, length: int, key) -> list[tuple[int, int, int]]:
        out = []
        end = start + length
        for seg in self.segments:
            src, dst = key(seg)
            lo, hi = max(start, src), min(end, src + seg.length)
            if lo < hi:
                out.append((dst + lo - src, hi - lo, lo))
        return out


@dataclass(frozen=True)
class StoredBytes:
    """Where a run of bytes lives: ``object`` (path relative to the checkpoint root),
    ``byte_offset`` and ``byte_length`` inside it, and one checksum per block."""

    object: str
    byte_offset: int
    byte_length: int
    checksums: tuple[int, ...] = ()


@dataclass
class TensorEntry:
    """A logical tensor of the checkpoint (one row of the header's tensor table).

    Attributes:
        fqn: flattened state-dict key.
        dtype: element type of the stored bytes.
        shape: the logical (global, unsharded) shape.
        fragments: how many fragments tile it (their rows live in the fragment indexes).
        mesh: index into :attr:`CheckpointMetadata.meshes`, ``None`` for a plain tensor.
        placements: the DTensor placements at save time, ``None`` for a plain tensor.
        dim_map: the map from the saved DTensor's (physical) indices to logical ones along one
            dim, where a pattern applied at save time (else ``None``).
        writers: the ranks whose fragment indexes hold this tensor's rows, where they cannot
            be derived from ``mesh`` + ``placements`` (plain tensors, irregular layouts); ``None``
            when derived (see :mod:`torch_ucp.metadata.routing`).
        content_hash: the layout-independent hash of the tensor's contents
            (:mod:`torch_ucp.metadata.content_hash`), or ``None`` where the save recorded none.
        saved_as: what the saving ranks held where it was neither a DTensor nor a plain tensor:
            ``"sharded_tensor"`` (``torch.distributed._shard``); informational, ``None`` else.
    """

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fragments: int = 0
    mesh: int | None = None
    placements: tuple[PlacementInfo, ...] | None = None
    dim_map: DimMap | None = None
    writers: tuple[int, ...] | None = None
    content_hash: int | None = None
    saved_as: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ValueEntry:
    """A non-tensor value (int, str, bytes, a small object from a Stateful).

    Attributes:
        fqn: flattened state-dict key.
        encoding: how the bytes encode the value (docs/FORMAT.md, "Value encodings").
        data: where the encoded bytes live.
        rank: the global rank that wrote it.
    """

    fqn: str
    encoding: str
    data: StoredBytes
    rank: int | None = None


@dataclass(frozen=True)
class IndexRef:
    """One writer rank's fragment index object: its name, size, crc32c and row count."""

    rank: int
    object: str
    nbytes: int
    crc32c: int
    rows: int


@dataclass
class SaveLayout:
    """What a save planner decides: the tensors (with their layouts and routing), meshes,
    patterns and DCP's flatten mapping. The writer commits it as the header's tables.

    Attributes:
        tensors: tensor entries by FQN, in state-dict order.
        meshes: the meshes they reference.
        patterns: layout rules recorded at save time (docs/PATTERNS.md).
        flatten_mapping: flattened FQN -> path in the nested state dict.
        rotate_min_bytes: the replicated-writer rule's threshold (:mod:`~.routing`).
    """

    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    meshes: list[MeshInfo] = field(default_factory=list)
    patterns: list[dict[str, Any]] = field(default_factory=list)
    flatten_mapping: dict[str, list[Any]] = field(default_factory=dict)
    rotate_min_bytes: int = ROTATE_MIN_BYTES

    def mesh_id(self, mesh: MeshInfo) -> int:
        """Index of ``mesh`` in :attr:`meshes`, appending it if new."""
        try:
            return self.meshes.index(mesh)
        except ValueError:
            self.meshes.append(mesh)
            return len(self.meshes) - 1


@dataclass
class CheckpointMetadata:
    """Everything a reader needs besides the fragment rows: the decoded header.

    Attributes:
        save_id: identifies the save that wrote the data objects (``data-<save_id>/``).
        world_size: ranks that took part in the save.
        tensors / values: entries keyed by FQN.
        meshes: the DeviceMeshes referenced by tensor entries.
        flatten_mapping: flattened FQN -> path in the nested state dict (DCP's mapping).
        checksum_algorithm / checksum_block_bytes: how data checksums were computed.
        checksum_block_width: block width along a row (:class:`~torch_ucp.metadata.checksums.
            BlockGrid`); ``None`` in version-1 checkpoints, whose blocks are flat.
        patterns: layout rules recorded at save time (see docs/PATTERNS.md).
        rotate_min_bytes: threshold of the replicated-writer rule (:mod:`~.routing`).
        indexes: the fragment index objects (version 2), by writer rank.
        torch_version / created: provenance.
        version: the format version the checkpoint was written with.
    """

    save_id: str
    world_size: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    values: dict[str, ValueEntry] = field(default_factory=dict)
    meshes: list[MeshInfo] = field(default_factory=list)
    flatten_mapping: dict[str, list[Any]] = field(default_factory=dict)
    checksum_algorithm: str = DEFAULT_CHECKSUM
    checksum_block_bytes: int = V1_CHECKSUM_BLOCK_BYTES
    checksum_block_width: int | None = None
    patterns: list[dict[str, Any]] = field(default_factory=list)
    rotate_min_bytes: int = ROTATE_MIN_BYTES
    indexes: list[IndexRef] = field(default_factory=list)
    torch_version: str = ""
    created: float = 0.0
    version: int = FORMAT_VERSION

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def data_folder(self) -> str:
        return f"{DATA_PREFIX}{self.save_id}"


def index_object_name(save_id: str, rank: int) -> str:
    """Where rank ``rank`` of save ``save_id`` writes its fragment index."""
    return f"{DATA_PREFIX}{save_id}/{rank:05d}.idx"


def data_object_name(save_id: str, rank: int, k: int) -> str:
    """The ``k``-th data object of rank ``rank`` of save ``save_id``."""
    return f"{DATA_PREFIX}{save_id}/{rank:05d}-{k}.bin"
