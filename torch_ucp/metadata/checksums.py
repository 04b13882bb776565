"""Checksums of the format: crc32c of metadata objects, block checksums of stored bytes.

A fragment's bytes are viewed as ``[mats, rows, row_bytes]``: ``row_bytes`` is its last dimension
in bytes, ``rows`` its second-to-last dimension and ``mats`` the product of the others. They are
cut into blocks of ``band`` rows by ``width`` bytes (:class:`BlockGrid`), one checksum each, so a
read that needs a box of the fragment (a row range, a column range, or both) widens it only to
the blocks around it, never to whole rows: a ``Shard(0)`` checkpoint loaded as ``Shard(1)``
reads each row's half and verifies exactly those bytes. ``width`` is ``block_width`` (2 KiB by
default) and ``band`` is ``block_bytes // width`` rows (64 KiB blocks by default); rows narrower
than ``block_width`` are whole blocks' width, and fragments of fewer than two dimensions (and
values) use flat blocks of ``block_bytes``. Version-1 checkpoints, written without a
``block_width``, use flat blocks for every fragment. docs/FORMAT.md specifies the layout.

crc32c (Castagnoli; hardware-accelerated by the ``crc32c`` package, several GB/s, and it
releases the GIL) is the default; zlib's crc32 is read for checkpoints that recorded it.
Metadata objects (header, fragment indexes) always use crc32c.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import crc32c as _crc32c
import numpy as np

_ALGORITHMS: dict[str, Callable[..., int]] = {"crc32": zlib.crc32, "crc32c": _crc32c.crc32c}

DEFAULT_ALGORITHM = "crc32c"


def crc32c(data: bytes | memoryview) -> int:
    """crc32c (Castagnoli) of ``data``."""
    return _crc32c.crc32c(data)


def checksum_function(algorithm: str) -> Callable[..., int]:
    """``fn(data, value=0)``: the checksum of ``data`` continuing from ``value``."""
    try:
        return _ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(
            f"checksum algorithm {algorithm!r} is not known (have {sorted(_ALGORITHMS)})"
        ) from None


@dataclass(frozen=True)
class BlockGrid:
    """The checksum blocks of one stored run of bytes, viewed as ``[mats, rows, row_bytes]``.

    Block ``(m, i, j)`` covers rows ``[i * band, (i + 1) * band)`` and bytes ``[j * width,
    (j + 1) * width)`` of each of those rows of matrix ``m`` (both clipped at the edge); its
    checksum is that of its row pieces concatenated in row order. Checksums are listed in
    ``(m, i, j)`` C order. A flat grid (one matrix of one row) is a run of ``width``-byte blocks.
    """

    mats: int
    rows: int
    row_bytes: int
    band: int
    width: int

    @staticmethod
    def flat(nbytes: int, block_bytes: int) -> BlockGrid:
        return BlockGrid(1, 1, nbytes, 1, block_bytes)

    @staticmethod
    def for_fragment(
        shape: Sequence[int], itemsize: int, block_bytes: int, block_width: int | None
    ) -> BlockGrid:
        """The grid of a fragment's C-contiguous bytes; ``block_width=None``: version 1 (flat)."""
        nbytes = math.prod(shape) * itemsize
        if block_width is None or len(shape) < 2:
            return BlockGrid.flat(nbytes, block_bytes)
        row_bytes = shape[-1] * itemsize
        width = max(1, min(row_bytes, block_width))
        return BlockGrid(math.prod(shape[:-2]), shape[-2], row_bytes, max(1, block_bytes // width), width)

    @staticmethod
    def counts(
        lengths: np.ndarray, ndims: np.ndarray, itemsize: np.ndarray, block_bytes: int, block_width: int | None
    ) -> np.ndarray:
        """:attr:`count` of many fragments at once: ``lengths`` ``[n, width]`` (padded with 1),
        each row's own number of dims and element size."""
        lengths = np.asarray(lengths, dtype=np.int64)
        n, width = lengths.shape
        nbytes = np.prod(lengths, axis=1) * itemsize
        flat = -(-nbytes // block_bytes)
        if block_width is None or width < 2 or n == 0:
            return flat
        nd = np.asarray(ndims, dtype=np.int64)
        rows = np.arange(n)
        last = lengths[rows, np.maximum(nd - 1, 0)]
        second = lengths[rows, np.maximum(nd - 2, 0)]
        row_bytes = last * itemsize
        mats = np.where(row_bytes * second > 0, nbytes // np.maximum(row_bytes * second, 1), 0)
        w = np.maximum(1, np.minimum(row_bytes, block_width))
        h = np.maximum(1, block_bytes // w)
        grid = mats * -(-second // h) * -(-row_bytes // w)
        return np.where(nd >= 2, grid, flat)

    @property
    def is_flat(self) -> bool:
        return self.mats == 1 and self.rows == 1

    @property
    def bands(self) -> int:
        return -(-self.rows // self.band)

    @property
    def pieces(self) -> int:
        return -(-self.row_bytes // self.width)

    @property
    def count(self) -> int:
        """How many checksums the grid has (0 for empty bytes)."""
        return self.mats * self.bands * self.pieces

    def index(self, m: int, i: int, j: int) -> int:
        return (m * self.bands + i) * self.pieces + j

    def checksums(self, data: memoryview, algorithm: str) -> list[int]:
        """Every block's checksum of ``data`` (the bytes the grid describes, C-contiguous)."""
        fn = checksum_function(algorithm)
        return self.verify_blocks(
            data, lambda m, r: (m * self.rows + r) * self.row_bytes, fn,
            range(self.mats), range(self.bands), range(self.pieces),
        )

    def verify_blocks(
        self,
        mem: memoryview,
        row_at: Callable[[int, int], int],
        fn: Callable[..., int],
        mats: Sequence[int],
        bands: range,
        pieces: range,
    ) -> list[int]:
        """Checksums of blocks ``mats x bands x pieces`` (C order), reading row ``r`` of matrix
        ``m`` at ``mem[row_at(m, r) + byte]`` (``row_at`` is affine in ``r`` within a matrix).

        Blocks of whole rows are contiguous: one checksum call each. Otherwise the full-width
        blocks of up to :data:`GATHER_BYTES` of consecutive bands are gathered block by block
        with one strided copy, then checksummed one call per block; a narrower last piece of
        each row is checksummed row by row."""
        out: list[int] = []
        w, rb, h = self.width, self.row_bytes, self.band
        spans = [(j * w, min(j * w + w, rb)) for j in pieces]
        whole_rows = len(spans) == 1 and spans[0] == (0, rb)
        full = len([j for j in pieces if j * w + w <= rb])  # full-width pieces come first
        narrow = spans[full:]
        # (bands of one row need no gathering: their blocks are contiguous)
        flat = np.frombuffer(mem, dtype=np.uint8) if full and not whole_rows and h > 1 else None
        for m in mats:
            i = bands.start
            while i < bands.stop:
                lo = i * h
                first = row_at(m, lo)
                stride = row_at(m, lo + 1) - first if self.rows - lo > 1 else rb
                if whole_rows and stride == rb:
                    hi = min(lo + h, self.rows)
                    out.append(fn(mem[first : first + (hi - lo) * rb]))  # one contiguous block
                    i += 1
                    continue
                # consecutive bands of h rows each (the last band of a matrix may be shorter)
                count = 1
                if flat is not None and lo + h <= self.rows:
                    per_band = h * full * w
                    count = max(1, min(bands.stop - i, (self.rows - lo) // h, GATHER_BYTES // per_band))
                rows = min(h, self.rows - lo)
                gathered = None
                if flat is not None:
                    view = np.lib.stride_tricks.as_strided(
                        flat[first + pieces.start * w :],
                        shape=(count, rows, full, w),
                        strides=(h * stride, stride, w, 1),
                        writeable=False,
                    )
                    gathered = np.ascontiguousarray(view.transpose(0, 2, 1, 3))
                for b in range(count):
                    crcs = [0] * len(spans)
                    if gathered is not None:
                        for k in range(full):
                            crcs[k] = fn(memoryview(gathered[b, k]).cast("B"))
                    if narrow or gathered is None:
                        todo = narrow if gathered is not None else spans
                        skip = len(spans) - len(todo)
                        for r in range(lo + b * h, lo + b * h + rows):
                            at = row_at(m, r)
                            for k, (a, z) in enumerate(todo, skip):
                                crcs[k] = fn(mem[at + a : at + z], crcs[k])
                    out.extend(crcs)
                i += count
        return out


GATHER_BYTES = 2 << 20  # a strided gather copies at most this much at once (stays in cache)


def block_checksums(data: memoryview, block_bytes: int, algorithm: str) -> list[int]:
    """Flat checksums: one per ``block_bytes`` block of ``data`` (values, version 1)."""
    return BlockGrid.flat(len(data), block_bytes).checksums(data, algorithm)
