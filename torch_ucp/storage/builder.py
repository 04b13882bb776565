"""CheckpointBuilder: write a torch_ucp checkpoint from one process, one tensor at a time.

Conversions and tools (``torch-ucp convert``) produce tensors one by one, from another format,
without a process group and without holding the model in memory. :class:`CheckpointBuilder`
streams each tensor's raw bytes into a data object as soon as it is added and keeps only its
location and checksums, so host memory stays near the largest tensor.

It writes the format directly, as rank 0 of a one-rank save, with the same pieces as
:class:`~torch_ucp.storage.writer.UCPWriter`: data objects ``data-<save_id>/00000-<k>.bin``
streamed by :class:`~torch_ucp.storage.objects.ObjectStream`, one fragment index
``data-<save_id>/00000.idx``, and the header ``.metadata`` written last and atomically by
:func:`~torch_ucp.storage.writer.commit`, which also removes data of earlier saves. Every
torch_ucp reader and ``torch-ucp verify`` accept the result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from torch_ucp.errors import CheckpointError, CheckpointExistsError
from torch_ucp.metadata.checksums import BlockGrid, crc32c
from torch_ucp.metadata.content_hash import bytes_hash
from torch_ucp.metadata.dtypes import dtype_to_name
from torch_ucp.metadata.header import encode_header
from torch_ucp.metadata.index import encode_index
from torch_ucp.metadata.raw_bytes import tensor_bytes
from torch_ucp.metadata.schema import (
    DATA_PREFIX,
    ITEM_ALIGNMENT,
    CheckpointMetadata,
    IndexRef,
    MeshInfo,
    PlacementInfo,
    SaveLayout,
    StoredBytes,
    TensorEntry,
    ValueEntry,
    data_object_name,
    index_object_name,
)
from torch_ucp.metadata.values import encode_value
from torch_ucp.storage import commit
from torch_ucp.storage.commit import new_save_id
from torch_ucp.storage.objects import ObjectStream
from torch_ucp.storage.store import Store
from torch_ucp.storage.writer import (
    RankWritten,
    UCPWriter,
    checkpoint_metadata,
    index_rows,
)

logger = logging.getLogger(__name__)

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
        overwrite: allow replacing a committed checkpoint at ``url`` (checked at construction
            and again, atomically, at commit).
        checksum_block_bytes / checksum_block_width: checksum blocks, as for
            :class:`~torch_ucp.UCPWriter`.
        max_object_bytes: start a new data object once the current one holds this many bytes
            (default: one object for everything).
        allow_pickle: store values without a pickle-free encoding with ``torch.save``.
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
        # the writer's options, validated by it; the builder then writes as its rank 0
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
        self.overwrite = overwrite
        self.max_object_bytes = max_object_bytes
        self.save_id: str = new_save_id()
        try:
            commit.begin(self.store, self.save_id, overwrite=overwrite)
        except CheckpointExistsError:
            raise CheckpointExistsError(
                f"{commit.EXISTS}: {self.store.url} already holds a committed checkpoint and "
                "overwrite is off; pass CheckpointBuilder(..., overwrite=True) to replace it"
            ) from None
        self.folder = f"{DATA_PREFIX}{self.save_id}"
        self.bytes_written = 0
        self.metadata: CheckpointMetadata | None = None
        self._stream: ObjectStream | None = None
        self._objects = 0
        self._layout = SaveLayout()
        self._written: list[tuple[str, tuple[int, ...], StoredBytes]] = []
        self._values: list[ValueEntry] = []
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
        shape = tuple(tensor.shape)
        stored = self._append(data, self._writer.block_grid(shape, tensor.dtype.itemsize))
        digest = None
        if self._writer.content_hash:
            digest = bytes_hash(data, tensor.dtype.itemsize, (0,) * len(shape), shape, shape)
        del data
        self._written.append((fqn, shape, stored))
        self._layout.flatten_mapping[fqn] = list(path) if path is not None else [fqn]
        recorded = mesh is not None and placements is not None
        if recorded:  # informational: the rank table is not known here
            mesh = MeshInfo(mesh.shape, mesh.dim_names)
        self._layout.tensors[fqn] = TensorEntry(
            fqn=fqn,
            dtype=tensor.dtype,
            shape=shape,
            fragments=1,
            mesh=self._layout.mesh_id(mesh) if recorded else None,
            placements=tuple(placements) if recorded else None,
            writers=(0,),
            content_hash=digest,
        )
        return stored

    def add_value(self, fqn: str, value: Any, *, path: Sequence[Any] | None = None) -> StoredBytes:
        """Write a non-tensor value (int, str, bytes, lists/dicts of them; anything else is
        stored with ``torch.save`` framing, as ``UCPWriter`` does)."""
        self._check_new(fqn)
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{fqn}: use add_tensor for tensors")
        encoding, payload = encode_value(value, name=fqn, allow_pickle=self._writer.allow_pickle)
        stored = self._append(memoryview(payload), self._writer.block_grid((len(payload),), 1))
        self._values.append(ValueEntry(fqn, encoding, stored, 0))
        self._layout.flatten_mapping[fqn] = list(path) if path is not None else [fqn]
        return stored

    def __contains__(self, fqn: object) -> bool:
        return fqn in self._layout.flatten_mapping

    def __len__(self) -> int:
        return len(self._layout.flatten_mapping)

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
            report = RankWritten(0, None, self._values, self.bytes_written)
            if self._written:
                keys, rows = index_rows([(f, (0,) * len(shape), shape, st) for f, shape, st in self._written], 0)
                blob = encode_index(0, keys, rows, self._writer.checksum_block_bytes, self._writer.checksum_block_width)
                name = index_object_name(self.save_id, 0)
                self.store.write_object(name, blob)
                report.index = IndexRef(0, name, len(blob), crc32c(blob), len(rows))
            if self._objects or self._written:
                self.store.fsync_dir(self.folder)
            meta = checkpoint_metadata(
                self._layout,
                [report],
                save_id=self.save_id,
                world_size=1,
                checksum_algorithm=self._writer.checksum_algorithm,
                checksum_block_bytes=self._writer.checksum_block_bytes,
                checksum_block_width=self._writer.checksum_block_width,
            )
            commit.publish(self.store, self.save_id, encode_header(meta), overwrite=self.overwrite)
            commit.remove_stale(self.store, self.save_id)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.metadata = meta
        return meta

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
        if fqn in self._layout.flatten_mapping:
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
            rel = data_object_name(self.save_id, 0, self._objects)
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
