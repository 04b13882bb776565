"""Fragment rows as columns: one row per fragment, one numpy array per field.

A fragment is an atomic piece of a logical tensor: a box (``offsets``, ``lengths``), stored as
C-contiguous little-endian bytes in a data object. Millions of them are never Python objects:
indexes decode straight into these columns, and planning, routing and verification work on
them with numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from torch_ucp.metadata.schema import StoredBytes


def tensor_key(fqn: str) -> int:
    """The 64-bit key an index row uses to name its tensor: the first 8 bytes of
    ``blake2b(fqn as UTF-8, digest_size=8)`` as a little-endian unsigned integer."""
    return int.from_bytes(hashlib.blake2b(fqn.encode("utf-8"), digest_size=8).digest(), "little")


def checksum_counts(byte_length: np.ndarray, block_bytes: int) -> np.ndarray:
    """Checksum blocks of each row: ``ceil(byte_length / block_bytes)`` (0 for empty rows)."""
    return -(-np.asarray(byte_length, dtype=np.int64) // block_bytes)


@dataclass
class FragmentRows:
    """Fragments as columns.

    Attributes:
        tensor: per row, the tensor it belongs to (an index into the reader's tensor list).
        offsets / lengths: ``[rows, ndim]`` boxes in the logical tensor (padded with 0 / 1
            beyond a tensor's own dims).
        objects: names of the data objects (relative to the checkpoint root).
        object: per row, an index into ``objects``.
        byte_offset / byte_length: where the row's bytes are in its data object.
        checksum_start: ``[rows + 1]``; row ``i``'s block checksums are
            ``checksums[checksum_start[i]:checksum_start[i + 1]]``.
        checksums: every row's block checksums, concatenated.
        rank: per row, the rank that wrote it.
    """

    tensor: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    objects: list[str]
    object: np.ndarray
    byte_offset: np.ndarray
    byte_length: np.ndarray
    checksum_start: np.ndarray
    checksums: np.ndarray
    rank: np.ndarray

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def ndim(self) -> int:
        return self.offsets.shape[1]

    def stored(self, i: int) -> StoredBytes:
        """Where row ``i``'s bytes are, with its checksums."""
        lo, hi = int(self.checksum_start[i]), int(self.checksum_start[i + 1])
        return StoredBytes(
            self.objects[int(self.object[i])],
            int(self.byte_offset[i]),
            int(self.byte_length[i]),
            tuple(self.checksums[lo:hi].tolist()),
        )

    def box(self, i: int, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Row ``i``'s ``(offsets, lengths)`` over the tensor's own ``ndim`` dims."""
        return tuple(self.offsets[i, :ndim].tolist()), tuple(self.lengths[i, :ndim].tolist())

    @classmethod
    def empty(cls, ndim: int = 0) -> FragmentRows:
        z = np.zeros(0, dtype=np.int64)
        return cls(
            tensor=z,
            offsets=np.zeros((0, ndim), dtype=np.int64),
            lengths=np.ones((0, ndim), dtype=np.int64),
            objects=[],
            object=np.zeros(0, dtype=np.int32),
            byte_offset=z,
            byte_length=z,
            checksum_start=np.zeros(1, dtype=np.int64),
            checksums=np.zeros(0, dtype=np.uint32),
            rank=np.zeros(0, dtype=np.int32),
        )

    @classmethod
    def concat(cls, parts: Sequence[FragmentRows]) -> FragmentRows:
        """All rows of ``parts``, in order (object names merged)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        ndim = max(p.ndim for p in parts)
        names: list[str] = []
        index: dict[str, int] = {}
        objects = []
        for p in parts:
            remap = np.array([index.setdefault(n, len(index)) for n in p.objects], dtype=np.int32)
            objects.append(remap[p.object] if len(remap) else p.object)
        names = list(index)
        counts = np.concatenate([np.diff(p.checksum_start) for p in parts])
        return cls(
            tensor=np.concatenate([p.tensor for p in parts]),
            offsets=_pad([p.offsets for p in parts], ndim, 0),
            lengths=_pad([p.lengths for p in parts], ndim, 1),
            objects=names,
            object=np.concatenate(objects).astype(np.int32),
            byte_offset=np.concatenate([p.byte_offset for p in parts]),
            byte_length=np.concatenate([p.byte_length for p in parts]),
            checksum_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            checksums=np.concatenate([p.checksums for p in parts]),
            rank=np.concatenate([p.rank for p in parts]),
        )

    def take(self, rows: np.ndarray) -> FragmentRows:
        """The rows ``rows`` (an index array), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.checksum_start[rows], self.checksum_start[rows + 1]
        counts = ends - starts
        picks = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        picks = picks + np.arange(int(counts.sum()), dtype=np.int64)
        return FragmentRows(
            tensor=self.tensor[rows],
            offsets=self.offsets[rows],
            lengths=self.lengths[rows],
            objects=self.objects,
            object=self.object[rows],
            byte_offset=self.byte_offset[rows],
            byte_length=self.byte_length[rows],
            checksum_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            checksums=self.checksums[picks],
            rank=self.rank[rows],
        )


def _pad(arrays: list[np.ndarray], ndim: int, fill: int) -> np.ndarray:
    out = np.full((sum(len(a) for a in arrays), ndim), fill, dtype=np.int64)
    row = 0
    for a in arrays:
        out[row : row + len(a), : a.shape[1]] = a
        row += len(a)
    return out
