"""DCP's types and the torch_ucp format, translated both ways.

Load: DCP's flow asks the storage reader for a ``Metadata`` before any planning. torch_ucp's
holds the header's tensor table (sizes, dtypes: no I/O) and makes a tensor's chunk list, which
needs every fragment of the tensor, only when a planner asks for it: a stock
``DefaultLoadPlanner`` does, per tensor; :class:`~torch_ucp.UCPLoadPlanner` never does (it asks
the catalog, in ``storage_data``, for the fragments its boxes overlap).

Save: the stored size of a ``WriteItem``, and the :class:`SaveLayout` of a save planned by a
stock planner (DCP's tensors, with the writers the coordinator recorded).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItem

from torch_ucp.metadata.catalog import FragmentCatalog
from torch_ucp.metadata.provenance import UCP_KEY, SaveInfo
from torch_ucp.metadata.schema import SaveLayout, TensorEntry


class CatalogChunks(Sequence):
    """A tensor's chunks (every fragment), fetched from the catalog on first access."""

    def __init__(self, catalog: FragmentCatalog, fqn: str) -> None:
        self._catalog, self._fqn = catalog, fqn
        self._chunks: list[ChunkStorageMetadata] | None = None

    def _all(self) -> list[ChunkStorageMetadata]:
        if self._chunks is None:
            self._catalog.require_tensor(self._fqn)
            rows = self._catalog.rows_of(self._fqn)
            ndim = len(self._catalog.entry(self._fqn).shape)
            offsets = self._catalog.rows.offsets[rows, :ndim].tolist()
            lengths = self._catalog.rows.lengths[rows, :ndim].tolist()
            self._chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(n)) for o, n in zip(offsets, lengths)]
        return self._chunks

    def __len__(self) -> int:
        return self._catalog.entry(self._fqn).fragments

    def __getitem__(self, i):  # type: ignore[override]
        return self._all()[i]

    def __iter__(self) -> Iterator[ChunkStorageMetadata]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (self._all(),))


class CatalogStateDict(Mapping):
    """``Metadata.state_dict_metadata`` of a checkpoint: tensors (header order), then values."""

    def __init__(self, catalog: FragmentCatalog | None = None) -> None:
        self._catalog = catalog
        self._cache: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}

    def catalog(self) -> FragmentCatalog:
        assert self._catalog is not None
        return self._catalog

    def _meta(self):
        return self.catalog().meta

    def __getitem__(self, fqn: str) -> TensorStorageMetadata | BytesStorageMetadata:
        found = self._cache.get(fqn)
        if found is None:
            meta = self._meta()
            entry = meta.tensors.get(fqn)
            if entry is not None:
                found = TensorStorageMetadata(
                    properties=TensorProperties(dtype=entry.dtype),
                    size=torch.Size(entry.shape),
                    chunks=CatalogChunks(self.catalog(), fqn),  # type: ignore[arg-type]
                )
            elif fqn in meta.values:
                found = BytesStorageMetadata()
            else:
                raise KeyError(fqn)
            self._cache[fqn] = found
        return found

    def __iter__(self) -> Iterator[str]:
        meta = self._meta()
        yield from meta.tensors
        yield from meta.values

    def __len__(self) -> int:
        meta = self._meta()
        return len(meta.tensors) + len(meta.values)

    def __contains__(self, fqn: object) -> bool:
        meta = self._meta()
        return fqn in meta.tensors or fqn in meta.values

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self.items()),))


def catalog_metadata(catalog: FragmentCatalog, checkpoint_id: str) -> Metadata:
    """DCP metadata of a checkpoint: lazy state-dict metadata, DCP's flatten mapping as
    ``planner_data``, and the catalog itself as ``storage_data`` (the reader's lookup)."""
    meta = catalog.meta
    return Metadata(
        state_dict_metadata=CatalogStateDict(catalog),  # type: ignore[arg-type]
        planner_data={k: tuple(v) for k, v in meta.flatten_mapping.items()},
        storage_data=catalog,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=meta.save_id),
    )


def write_item_nbytes(item: WriteItem) -> int:
    """Bytes an item occupies in storage (a value: its serialized size, if known)."""
    if item.tensor_data is None:
        return item.bytes_io_data.nbytes if item.bytes_io_data is not None else 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def layout_from_dcp(metadata: Metadata, writers: dict[str, set[int]]) -> SaveLayout:
    """The layout of a save planned by a stock planner: DCP's tensors with recorded writers."""
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    info = SaveInfo.from_planner_data(planner_data)
    layout = SaveLayout(patterns=info.patterns if info is not None else [])
    layout.flatten_mapping = {k: list(v) for k, v in planner_data.items() if k != UCP_KEY}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            layout.flatten_mapping.setdefault(fqn, [fqn])
            continue
        assert isinstance(md, TensorStorageMetadata)
        layout.tensors[fqn] = TensorEntry(
            fqn=fqn,
            dtype=md.properties.dtype,
            shape=tuple(md.size),
            fragments=len(md.chunks),
            writers=tuple(sorted(writers.get(fqn, ()))),
        )
        layout.flatten_mapping.setdefault(fqn, [fqn])
    return layout
