"""A checkpoint's fragments as a reader sees them: the header, and index rows fetched on demand.

:class:`FragmentCatalog` answers "which fragments of tensor T overlap this box?" for a loading
rank. For version 2 it starts with the header only; :meth:`~FragmentCatalog.require` takes every
box the rank will read, works out which writer indexes hold them
(:mod:`~torch_ucp.metadata.routing`), fetches those (all at once, in parallel, through the
``fetch`` callback of the storage layer), verifies each one's size and crc32c against the
header, decodes it into columns and checks every row against the tensor table. Version 1
checkpoints have every row in the header. Checking that the rows found tile each box exactly
(:func:`~torch_ucp.metadata.tiling.tiling_problem`) is the caller's last step before reading.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.metadata.checksums import BlockGrid, crc32c
from torch_ucp.metadata.fragments import FragmentRows, tensor_key
from torch_ucp.metadata.index import decode_index
from torch_ucp.metadata.routing import box_writers
from torch_ucp.metadata.schema import CheckpointMetadata, IndexRef, StoredBytes, TensorEntry
from torch_ucp.metadata.tiling import tiling_problem

logger = logging.getLogger(__name__)

FetchIndexes = Callable[[Sequence[IndexRef]], Sequence[bytes]]
"""Reads index objects (in parallel where it can); returns their bytes in order."""


@dataclass(frozen=True)
class Fragment:
    """One fragment row: its box in the logical tensor and where its bytes are."""

    row: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    data: StoredBytes
    rank: int


class FragmentCatalog:
    """Header plus the fragment rows fetched so far (see the module docstring).

    Args:
        meta: the decoded header.
        rows: every fragment row (version 1), or ``None`` (version 2: fetched via ``fetch``).
        fetch: reads index objects; needed for version 2.
        source: how errors name the checkpoint (its URL).
    """

    def __init__(
        self,
        meta: CheckpointMetadata,
        rows: FragmentRows | None = None,
        fetch: FetchIndexes | None = None,
        source: str = "<checkpoint>",
    ) -> None:
        self.meta = meta
        self.source = source
        self._fetch = fetch
        self.names = list(meta.tensors)
        self.entries = [meta.tensors[n] for n in self.names]
        self.position = {name: i for i, name in enumerate(self.names)}
        ndim = max((len(e.shape) for e in self.entries), default=0)
        self._shape = np.ones((len(self.entries), ndim), dtype=np.int64)
        for i, e in enumerate(self.entries):
            self._shape[i, : len(e.shape)] = e.shape
        self._itemsize = np.array([e.dtype.itemsize for e in self.entries], dtype=np.int64)
        self._ndims = np.array([len(e.shape) for e in self.entries], dtype=np.int64)
        keys = np.array([tensor_key(n) for n in self.names], dtype=np.uint64)
        self._key_order = np.argsort(keys)
        self._keys_sorted = keys[self._key_order]
        if len(np.unique(keys)) != len(keys):
            raise CorruptCheckpointError(f"{source}: two tensor names share one 64-bit key")
        self._indexes = {ref.rank: ref for ref in meta.indexes}
        self._lock = threading.Lock()
        self._by_tensor: list[np.ndarray] | None = None
        self.bytes_fetched = 0
        self.indexes_fetched = 0
        if rows is not None:  # version 1: everything is here
            self._rows = rows
            self._loaded = set(self._indexes) | {-1}
            self._complete = True
            self._check_rows(rows, source)
        else:
            self._rows = FragmentRows.empty(ndim)
            self._loaded = set()
            self._complete = not self._indexes

    # -- what is known without fetching --------------------------------------------------------
    def entry(self, fqn: str) -> TensorEntry:
        return self.meta.tensors[fqn]

    @property
    def rows(self) -> FragmentRows:
        """Every row fetched so far."""
        return self._rows

    @property
    def complete(self) -> bool:
        """Whether every index has been fetched."""
        return self._complete

    # -- fetching -------------------------------------------------------------------------------
    def writers_for(self, fqn: str, offsets: Sequence[int], lengths: Sequence[int]) -> np.ndarray | None:
        """Ranks whose indexes hold the rows of ``fqn`` overlapping the box (``None``: every
        index)."""
        t = self.position[fqn]
        return box_writers(self.entries[t], t, self.meta.meshes, self.meta.rotate_min_bytes, offsets, lengths)

    def require(self, boxes: Iterable[tuple[str, Sequence[int], Sequence[int]]]) -> None:
        """Fetch every index holding rows that overlap one of the ``(fqn, offsets, lengths)``."""
        if self._complete:
            return
        ranks: set[int] = set()
        for fqn, offsets, lengths in boxes:
            writers = self.writers_for(fqn, offsets, lengths)
            if writers is None:
                self.require_all()
                return
            ranks.update(writers.tolist())
        self._load(sorted(r for r in ranks if r in self._indexes and r not in self._loaded))

    def require_tensor(self, fqn: str) -> None:
        """Fetch every index that can hold rows of ``fqn``."""
        e = self.entry(fqn)
        self.require([(fqn, (0,) * len(e.shape), e.shape)])

    def require_all(self) -> None:
        """Fetch every index."""
        if not self._complete:
            self._load(sorted(r for r in self._indexes if r not in self._loaded))

    def _load(self, ranks: list[int]) -> None:
        if not ranks:
            return
        if self._fetch is None:
            raise CorruptCheckpointError(f"{self.source}: fragment indexes are needed but cannot be read")
        refs = [self._indexes[r] for r in ranks]
        blobs = self._fetch(refs)
        parts = []
        for ref, blob in zip(refs, blobs):
            where = f"{self.source.rstrip('/')}/{ref.object}"
            if len(blob) != ref.nbytes:
                raise CorruptCheckpointError(
                    f"fragment index {where} is {len(blob)} bytes, the header says {ref.nbytes}"
                )
            got = crc32c(blob)
            if got != ref.crc32c:
                raise CorruptCheckpointError(
                    f"fragment index {where} is corrupt: crc32c {got:08x}, the header says "
                    f"{ref.crc32c:08x} (edited or damaged; nothing was loaded)"
                )
            rank, keys, rows, blocks = decode_index(blob, where)
            if rank != ref.rank or len(rows) != ref.rows:
                raise CorruptCheckpointError(
                    f"fragment index {where} is of rank {rank} with {len(rows)} rows, the header "
                    f"says rank {ref.rank} with {ref.rows}"
                )
            if blocks != (self.meta.checksum_block_bytes, self.meta.checksum_block_width):
                raise CorruptCheckpointError(
                    f"fragment index {where} has checksum blocks {blocks}, the header says "
                    f"{(self.meta.checksum_block_bytes, self.meta.checksum_block_width)}"
                )
            rows.tensor = self._tensor_ids(keys, where)
            self._check_rows(rows, where)
            parts.append(rows)
            self.bytes_fetched += len(blob)
        with self._lock:
            self._rows = FragmentRows.concat([self._rows, *parts])
            self._loaded.update(ranks)
            self.indexes_fetched += len(ranks)
            self._complete = all(r in self._loaded for r in self._indexes)
            self._by_tensor = None

    def _tensor_ids(self, keys: np.ndarray, where: str) -> np.ndarray:
        pos = np.searchsorted(self._keys_sorted, keys)
        pos = np.minimum(pos, len(self._keys_sorted) - 1)
        if len(keys) and (len(self._keys_sorted) == 0 or (self._keys_sorted[pos] != keys).any()):
            raise CorruptCheckpointError(f"fragment index {where} names a tensor the header does not list")
        return self._key_order[pos].astype(np.int64)

    def _check_rows(self, rows: FragmentRows, where: str) -> None:
        """Every row inside its tensor, of the byte length its box and dtype need."""
        if not len(rows):
            return
        t = rows.tensor
        width = min(rows.ndim, self._shape.shape[1])
        shape = self._shape[t]
        ndim = self._ndims[t]
        dims = np.arange(rows.ndim)[None, :]
        inside = dims < ndim[:, None]
        off, lens = rows.offsets, rows.lengths
        bad = (off < 0) | (lens < 0)
        bad[:, :width] |= inside[:, :width] & (off[:, :width] + lens[:, :width] > shape[:, :width])
        bad |= ~inside & ((off != 0) | (lens != 1))
        numel = np.prod(np.where(inside, lens, 1), axis=1)
        wrong_bytes = rows.byte_length != numel * self._itemsize[t]
        if self.meta.version >= 2:  # version 1 listed its checksums explicitly, in flat blocks
            counts = BlockGrid.counts(
                np.where(inside, lens, 1), ndim, self._itemsize[t],
                self.meta.checksum_block_bytes, self.meta.checksum_block_width,
            )
            wrong_bytes |= np.diff(rows.checksum_start) != counts
        problem = np.flatnonzero(bad.any(axis=1) | wrong_bytes)
        if len(problem):
            i = int(problem[0])
            e = self.entries[int(t[i])]
            o, n = rows.box(i, len(e.shape))
            raise CorruptCheckpointError(
                f"{where}: fragment of {e.fqn!r} at offsets {list(o)} lengths {list(n)} with "
                f"{int(rows.byte_length[i])} bytes and {int(rows.checksum_start[i + 1] - rows.checksum_start[i])} "
                f"checksums does not fit the tensor ({e.dtype}, shape {list(e.shape)})"
            )

    # -- queries -------------------------------------------------------------------------------
    def _rows_of(self, t: int) -> np.ndarray:
        with self._lock:
            if self._by_tensor is None:
                order = np.argsort(self._rows.tensor, kind="stable")
                bounds = np.searchsorted(self._rows.tensor[order], np.arange(len(self.entries) + 1))
                self._by_tensor = [order[bounds[i] : bounds[i + 1]] for i in range(len(self.entries))]
            return self._by_tensor[t]

    def rows_of(self, fqn: str) -> np.ndarray:
        """Row numbers (into :attr:`rows`) of ``fqn`` fetched so far."""
        return self._rows_of(self.position[fqn])

    def overlapping(self, fqn: str, offsets: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
        """Rows of ``fqn`` (fetched so far) overlapping the box, in row order."""
        t = self.position[fqn]
        rows = self._rows_of(t)
        ndim = len(self.entries[t].shape)
        if ndim == 0 or not len(rows):
            return rows
        lo = self._rows.offsets[rows, :ndim]
        hi = lo + self._rows.lengths[rows, :ndim]
        q_lo = np.asarray(offsets, dtype=np.int64)
        q_hi = q_lo + np.asarray(lengths, dtype=np.int64)
        hit = ((np.minimum(hi, q_hi) - np.maximum(lo, q_lo)) > 0).all(axis=1)
        return rows[hit]

    def fragment(self, row: int) -> Fragment:
        e = self.entries[int(self._rows.tensor[row])]
        offsets, lengths = self._rows.box(row, len(e.shape))
        return Fragment(row, offsets, lengths, self._rows.stored(row), int(self._rows.rank[row]))

    def fragments_for(self, fqn: str, offsets: Sequence[int], lengths: Sequence[int]) -> list[Fragment]:
        """The fragments tiling the box, checked: raises ``CorruptCheckpointError`` naming the
        tensor if they leave a gap or overlap. Fetches what is missing (and, if the derived
        indexes do not cover the box, every index, with a warning)."""
        rows, problem = self._tiled(fqn, offsets, lengths)
        if problem is not None and not self._complete:  # not fetched yet?
            self.require([(fqn, offsets, lengths)])
            rows, problem = self._tiled(fqn, offsets, lengths)
        if problem is not None and not self._complete:
            logger.warning(
                "torch_ucp: %s: the indexes derived for %r do not cover a box of it (%s); reading "
                "every fragment index", self.source, fqn, problem,
            )
            self.require_all()
            rows, problem = self._tiled(fqn, offsets, lengths)
        if problem is not None:
            raise CorruptCheckpointError(
                f"{self.source}: the fragments of {fqn!r} do not tile the box at offsets "
                f"{list(offsets)} lengths {list(lengths)}: {problem}"
            )
        return [self.fragment(int(r)) for r in rows]

    def _tiled(self, fqn: str, offsets: Sequence[int], lengths: Sequence[int]) -> tuple[np.ndarray, str | None]:
        """The rows overlapping the box, and ``None`` if they tile it exactly (else why not)."""
        rows = self.overlapping(fqn, offsets, lengths)
        ndim = len(offsets)
        lo = self._rows.offsets[rows, :ndim]
        hi = lo + self._rows.lengths[rows, :ndim]
        if len(rows) == 1 and ndim:  # the common case: one fragment holds the whole box
            q_lo = np.asarray(offsets, dtype=np.int64)
            if (lo[0] <= q_lo).all() and (hi[0] >= q_lo + np.asarray(lengths, dtype=np.int64)).all():
                return rows, None
        q_lo = np.asarray(offsets, dtype=np.int64)
        return rows, tiling_problem(lo, hi, q_lo, q_lo + np.asarray(lengths, dtype=np.int64))
