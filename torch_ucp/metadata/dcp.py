"""DCP's :class:`Metadata` over a :class:`~torch_ucp.metadata.catalog.FragmentCatalog`, lazily.

DCP's load flow asks the storage reader for a ``Metadata`` before any planning. torch_ucp's
holds the header's tensor table (sizes, dtypes: no I/O) and makes a tensor's chunk list, which
needs every fragment of the tensor, only when a planner asks for it: a stock
``DefaultLoadPlanner`` does, per tensor; :class:`~torch_ucp.UCPLoadPlanner` never does (it asks
the catalog, in ``storage_data``, for the fragments its boxes overlap).
"""

from __future__ import annotations

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

from torch_ucp.metadata.catalog import FragmentCatalog


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

