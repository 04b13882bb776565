"""Reading a checkpoint without torch.distributed: keys, shapes, dtypes, whole tensors or slices."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from torch_ucp.errors import KeyNotFoundError
from torch_ucp.metadata.catalog import Fragment, FragmentCatalog
from torch_ucp.metadata.schema import CheckpointMetadata, TensorEntry
from torch_ucp.planner.boxes import intersect
from torch_ucp.storage.fragment_reader import BoxRead, FragmentReader, ReadStats, normalize_verify
from torch_ucp.storage.reader import open_catalog, read_value
from torch_ucp.storage.store import Store, open_store

Index = int | slice | Sequence[int | slice] | None


def _normalize_index(index: Index, shape: tuple[int, ...], fqn: str) -> tuple[list[int], list[int], list[int]]:
    """``(offsets, lengths, dims_to_squeeze)`` of a basic (int/slice, step 1) index."""
    if index is None:
        items: list[int | slice] = []
    elif isinstance(index, (int, slice)):
        items = [index]
    else:
        items = list(index)
    if len(items) > len(shape):
        raise IndexError(f"{fqn}: {len(items)} indices for a tensor of shape {shape}")
    offsets, lengths, squeeze = [], [], []
    for dim, size in enumerate(shape):
        item = items[dim] if dim < len(items) else slice(None)
        if isinstance(item, int):
            i = item + size if item < 0 else item
            if not 0 <= i < size:
                raise IndexError(f"{fqn}: index {item} out of range for dim {dim} of size {size}")
            offsets.append(i)
            lengths.append(1)
            squeeze.append(dim)
        elif isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step != 1:
                raise IndexError(f"{fqn}: only step-1 slices are supported, got {item}")
            offsets.append(start)
            lengths.append(max(0, stop - start))
        else:
            raise TypeError(f"{fqn}: index items must be int or slice, got {type(item).__name__}")
    return offsets, lengths, squeeze


class Checkpoint:
    """A committed torch_ucp checkpoint opened for reading in a plain process.

    Obtained from :func:`open_checkpoint`. Opening reads only the header: ``keys``, ``shape``
    and ``dtype`` need nothing more, and ``read`` fetches the fragment indexes and then the
    bytes of the requested region only. ``stats`` accumulates bytes read and needed.
    """

    def __init__(
        self,
        store: Store,
        catalog: FragmentCatalog,
        *,
        verify: bool | str = True,
        allow_pickle: bool = False,
    ):
        self.store = store
        self.catalog = catalog
        self.verify = normalize_verify(verify)
        self.allow_pickle = bool(allow_pickle)
        self.stats = ReadStats()
        self._reader = FragmentReader.for_checkpoint(store, catalog.meta, verify=self.verify)

    @property
    def metadata(self) -> CheckpointMetadata:
        """The decoded header."""
        return self.catalog.meta

    @property
    def url(self) -> str:
        return self.store.url

    def keys(self) -> list[str]:
        """Every FQN, tensors and non-tensor values, in saved order."""
        return [*self.metadata.tensors, *self.metadata.values]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, fqn: object) -> bool:
        return fqn in self.metadata.tensors or fqn in self.metadata.values

    def __len__(self) -> int:
        return len(self.metadata.tensors) + len(self.metadata.values)

    def tensor_entry(self, fqn: str) -> TensorEntry:
        try:
            return self.metadata.tensors[fqn]
        except KeyError:
            kind = "a non-tensor value" if fqn in self.metadata.values else "not in the checkpoint"
            raise KeyNotFoundError(f"{fqn!r} is {kind} ({self.url})") from None

    def fragments(self, fqn: str) -> list[Fragment]:
        """Every fragment of tensor ``fqn`` (boxes, data objects, byte ranges, writer ranks),
        checked to tile the tensor exactly; reads the fragment indexes that hold them."""
        entry = self.tensor_entry(fqn)
        return self.catalog.fragments_for(fqn, (0,) * len(entry.shape), entry.shape)

    def shape(self, fqn: str) -> torch.Size:
        return torch.Size(self.tensor_entry(fqn).shape)

    def dtype(self, fqn: str) -> torch.dtype:
        return self.tensor_entry(fqn).dtype

    def read(self, fqn: str, index: Index = None, *, out: torch.Tensor | None = None) -> Any:
        """The tensor (or a basic-slice region of it) as a CPU tensor, or a non-tensor value.

        ``index`` is an int, a step-1 slice or a tuple of them, as in ``t[index]``. ``out``, if
        given, receives the region (cast to its dtype) and is returned.
        """
        if fqn in self.metadata.values:
            if index is not None:
                raise IndexError(f"{fqn!r} is a non-tensor value and cannot be sliced")
            return read_value(
                self.store, self.metadata.values[fqn], self.metadata, self.verify,
                allow_pickle=self.allow_pickle,
            )
        entry = self.tensor_entry(fqn)
        offsets, lengths, squeeze = _normalize_index(index, entry.shape, fqn)
        if out is None:
            region = torch.empty(lengths, dtype=entry.dtype)
        else:
            if out.numel() != torch.Size(lengths).numel():
                raise ValueError(f"{fqn}: out has {out.numel()} elements, region has shape {lengths}")
            region = out.view(lengths)
        reads = []
        for f in self.catalog.fragments_for(fqn, offsets, lengths) if region.numel() else ():
            hit = intersect(offsets, lengths, f.offsets, f.lengths)
            if hit is None:
                continue
            off, lens = hit
            dest = region
            for dim, (o, n) in enumerate(zip(off, lens)):
                dest = dest.narrow(dim, o - offsets[dim], n)
            reads.append(
                BoxRead(
                    name=fqn,
                    data=f.data,
                    dtype=entry.dtype,
                    fragment_offsets=f.offsets,
                    fragment_shape=f.lengths,
                    offsets=tuple(o - fo for o, fo in zip(off, f.offsets)),
                    lengths=lens,
                    dest=dest,
                )
            )
        self.stats.add(self._reader.read(reads))
        result = out if out is not None else region
        for dim in reversed(squeeze):
            result = result.squeeze(dim) if out is None else result
        return result

    def __repr__(self) -> str:
        gib = self.metadata.total_tensor_bytes / 2**30
        return (
            f"Checkpoint({self.url!r}, {len(self.metadata.tensors)} tensors, "
            f"{len(self.metadata.values)} values, {gib:.3f} GiB)"
        )


def open_checkpoint(
    url: str | os.PathLike,
    *,
    verify: bool | str = True,
    allow_pickle: bool = False,
    follow_symlinks: bool = False,
    **storage_options: Any,
) -> Checkpoint:
    """Open a committed torch_ucp checkpoint for reading, with no process group.

    ``verify``, ``allow_pickle`` and ``follow_symlinks`` are those of
    :class:`~torch_ucp.UCPReader`: every byte read is verified, values stored with pickle are
    refused and symbolic links are not followed, unless told otherwise.

    Example::

        ckpt = torch_ucp.open_checkpoint("s3://bucket/run/step-100", endpoint_url=...)
        ckpt.keys(); ckpt.shape("model.tok_embeddings.weight")
        rows = ckpt.read("model.tok_embeddings.weight", (slice(0, 16),))
    """
    store = open_store(url, storage_options, follow_symlinks=follow_symlinks)
    return Checkpoint(store, open_catalog(store), verify=verify, allow_pickle=allow_pickle)
