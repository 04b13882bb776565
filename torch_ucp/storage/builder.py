"""CheckpointBuilder: write a torch_ucp checkpoint from one process, one tensor at a time.

Conversions and tools (``torch-ucp convert``) produce tensors one by one, from another format,
without a process group and without holding the model in memory. :class:`CheckpointBuilder`
streams each tensor's raw bytes into a data object as soon as it is added and keeps only its
location and checksums, so host memory stays near the largest tensor.

It drives :class:`~torch_ucp.storage.writer.UCPWriter` as the coordinator of a one-rank save:
``prepare_global_plan`` refuses to replace a committed checkpoint unless ``overwrite`` and picks
the save id, and ``finish`` joins the write results into the metadata
(:func:`~torch_ucp.storage.writer.build_checkpoint_metadata`), writes ``.metadata`` last and
atomically and removes data of earlier saves. The result is a checkpoint in exactly the layout a
``dcp.save`` with ``UCPWriter`` writes (``data-<save_id>/00000-<k>.bin`` + ``.metadata``), which
every torch_ucp reader and ``torch-ucp verify`` accept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from torch_ucp.errors import CheckpointError, CheckpointExistsError
from torch_ucp.metadata.codec import placement_to_json
from torch_ucp.metadata.dtypes import dtype_to_name
from torch_ucp.metadata.schema import CheckpointMetadata, MeshInfo, PlacementInfo, StoredBytes
from torch_ucp.planner.provenance import UCP_KEY, SaveInfo
from torch_ucp.storage import commit
from torch_ucp.storage.checksum import BlockGrid
from torch_ucp.storage.objects import ITEM_ALIGNMENT, ObjectStream
from torch_ucp.storage.store import Store
from torch_ucp.storage.values import encode_value
from torch_ucp.storage.writer import DATA_PREFIX, ItemStored, UCPWriter, tensor_bytes

__all__ = ["CheckpointBuilder"]


class CheckpointBuilder:
    """Writes a torch_ucp checkpoint from a single process, streaming tensor by tensor.

    Example::

        with CheckpointBuilder("s3://bucket/run/converted", endpoint_url=...) as b:
            for name, tensor in tensors():           # e.g. read one at a time elsewhere
                b.add_tensor(f"model.{name}", tensor)
            b.add_value("step", 1000)
        # leaving the block commits; an exception aborts (nothing is committed)

    Each tensor's bytes are written (with block checksums) when it is added and the builder
    keeps no reference to it, so peak host memory is about the largest tensor plus one write
    buffer. Nothing is visible at ``url`` as a checkpoint until :meth:`commit` writes
    ``.metadata``; a committed checkpoint already there stays loadable until then.

    Object stores: the data object is a multipart upload whose parts s3fs retries on transient
    errors; a failure that outlives those retries aborts the upload (the builder cannot replay
    tensors it no longer holds), and the conversion has to be run again.

    Args:
        url: checkpoint folder: a path or fsspec URL.
        overwrite: allow replacing a committed checkpoint at ``url`` (checked at construction).
        checksum_block_bytes / checksum_block_width: checksum blocks (default: the writer's).
        max_object_bytes: start a new data object once the current one holds this many bytes
            (default: one object for everything).
        allow_pickle: store values with no pickle-free encoding with ``torch.save`` (default:
            refuse them, naming the key and the type).
        **storage_options: passed to fsspec (``endpoint_url=``, ``key=``, ...).
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        overwrite: bool = False,
        checksum_block_bytes: int | None = None,
        checksum_block_width: int | None = None,
        max_object_bytes: int | None = None,
        allow_pickle: bool = False,
        **storage_options: Any,
    ) -> None:
        self._writer = UCPWriter(
            url,
            overwrite=overwrite,
            checksum_block_bytes=checksum_block_bytes,
            checksum_block_width=checksum_block_width,
            allow_pickle=allow_pickle,
            **storage_options,
        )
        assert self._writer.store is not None
        self.store: Store = self._writer.store
        self.max_object_bytes = max_object_bytes
        # The coordinator step of a save: overwrite check and a fresh save id.
        try:
            (plan,) = self._writer.prepare_global_plan([SavePlan([])])
        except CheckpointExistsError:
            raise CheckpointExistsError(
                f"{self.store.url} already holds a committed checkpoint; pass "
                "CheckpointBuilder(..., overwrite=True) to replace it"
            ) from None
        self.save_id: str = plan.storage_data.save_id
        self.folder = f"{DATA_PREFIX}{self.save_id}"
        self.bytes_written = 0
        self.metadata: CheckpointMetadata | None = None
        self._stream: ObjectStream | None = None
        self._objects = 0
        self._state_md: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        self._results: list[WriteResult] = []
        self._mappings: dict[str, tuple[Any, ...]] = {}
        self._info = SaveInfo()
        self._mesh_index: dict[MeshInfo, int] = {}
        self._closed = False

    @property
    def url(self) -> str:
        return self.store.url

    # -- adding data --------------------------------------------------------------------------
    def add_tensor(
        self,
        fqn: str,
        tensor: torch.Tensor,
        *,
        path: Sequence[Any] | None = None,
        mesh: MeshInfo | None = None,
        placements: Sequence[PlacementInfo] | None = None,
    ) -> StoredBytes:
        """Write ``tensor`` (a whole, plain tensor: CPU or not, any strides) under ``fqn``.

        ``path`` is the key's path in the nested state dict (DCP's flatten mapping; default
        ``[fqn]``). ``mesh`` and ``placements`` record the layout the tensor was trained with
        (informational: ``torch-ucp inspect`` shows it; loading works on any layout anyway).
        """
        self._check_new(fqn)
        if not isinstance(tensor, torch.Tensor) or isinstance(tensor, DTensor):
            raise TypeError(
                f"{fqn}: add_tensor takes a whole, plain torch.Tensor, got "
                f"{type(tensor).__name__} (call .full_tensor() on a DTensor first)"
            )
        try:
            dtype_to_name(tensor.dtype)
        except ValueError as e:
            raise ValueError(f"{fqn}: {e}") from None
        data = tensor_bytes(tensor)
        stored = self._append(data, self._writer.block_grid(tuple(tensor.shape), tensor.dtype.itemsize))
        del data
        shape = torch.Size(tensor.shape)
        self._state_md[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=tensor.dtype),
            size=shape,
            chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)],
        )
        self._results.append(
            WriteResult(
                index=MetadataIndex(fqn, [0] * len(shape)),
                size_in_bytes=stored.byte_length,
                storage_data=ItemStored(stored, 0),
            )
        )
        self._mappings[fqn] = tuple(path) if path is not None else (fqn,)
        if mesh is not None and placements is not None:
            index = self._mesh_index.get(mesh)
            if index is None:
                index = self._mesh_index[mesh] = len(self._info.meshes)
                self._info.meshes.append(
                    {
                        "shape": list(mesh.shape),
                        "dim_names": list(mesh.dim_names) if mesh.dim_names else None,
                    }
                )
            self._info.tensors[fqn] = {
                "mesh": index,
                "placements": [placement_to_json(p) for p in placements],
                "ranks": [0],
            }
        return stored

    def add_value(self, fqn: str, value: Any, *, path: Sequence[Any] | None = None) -> StoredBytes:
        """Write a non-tensor value, encoded without pickle as ``UCPWriter`` does
        (:mod:`torch_ucp.storage.values`); one with no such encoding is refused unless
        ``allow_pickle``."""
        self._check_new(fqn)
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{fqn}: use add_tensor for tensors")
        encoding, payload = encode_value(value, name=fqn, allow_pickle=self._writer.allow_pickle)
        stored = self._append(memoryview(payload), self._writer.block_grid((len(payload),), 1))
        self._state_md[fqn] = BytesStorageMetadata()
        self._results.append(
            WriteResult(
                index=MetadataIndex(fqn),
                size_in_bytes=stored.byte_length,
                storage_data=ItemStored(stored, 0, encoding),
            )
        )
        self._mappings[fqn] = tuple(path) if path is not None else (fqn,)
        return stored

    def __contains__(self, fqn: object) -> bool:
        return fqn in self._state_md

    def __len__(self) -> int:
        return len(self._state_md)

    # -- commit / abort -----------------------------------------------------------------------
    def commit(self) -> CheckpointMetadata:
        """Close the data objects durably, then write ``.metadata`` (atomically, last) and
        remove data of earlier saves at the URL. Returns the committed metadata."""
        if self._closed:
            raise CheckpointError(f"{self.url}: this builder was already committed or aborted")
        try:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            if self._objects:
                self.store.fsync_dir(self.folder)
            planner_data: dict[str, Any] = dict(self._mappings)
            planner_data[UCP_KEY] = self._info.to_json()
            self._writer.finish(
                Metadata(state_dict_metadata=self._state_md, planner_data=planner_data),
                [self._results],
            )
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.metadata = self._writer.metadata
        self.save_id = self.metadata.save_id  # differs only if nothing was added
        return self.metadata

    def abort(self) -> None:
        """Give up: abort the open upload and remove this save's data (nothing was committed,
        a checkpoint committed earlier at the URL is untouched)."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        commit.discard(self.store, self.save_id)

    def __enter__(self) -> CheckpointBuilder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.commit()
        else:
            self.abort()

    # -- internals ----------------------------------------------------------------------------
    def _check_new(self, fqn: str) -> None:
        if self._closed:
            raise CheckpointError(f"{self.url}: this builder was already committed or aborted")
        if not isinstance(fqn, str) or not fqn:
            raise ValueError(f"keys must be non-empty strings, got {fqn!r}")
        if fqn in self._state_md:
            raise ValueError(f"{fqn!r} was already added to {self.url}")

    def _append(self, data: memoryview, grid: BlockGrid) -> StoredBytes:
        stream = self._stream
        if (
            stream is not None
            and self.max_object_bytes is not None
            and stream.offset > 0
            and stream.offset + len(data) > self.max_object_bytes
        ):
            stream.close()
            stream = self._stream = None
        if stream is None:
            if self._objects == 0:
                self.store.makedirs(self.folder)
            rel = f"{self.folder}/{0:05d}-{self._objects}.bin"
            self._objects += 1
            try:
                stream = self._stream = ObjectStream(self.store, rel, ITEM_ALIGNMENT)
            except BaseException:
                self.abort()
                raise
        try:
            stored = stream.append(data, grid, self._writer.checksum_algorithm)
        except BaseException:
            self.abort()
            raise
        self.bytes_written += stored.byte_length
        return stored
