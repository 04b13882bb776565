"""Box intersection, the one geometric operation loading needs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def intersect(
    a_off: Sequence[int], a_len: Sequence[int], b_off: Sequence[int], b_len: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The overlap of two boxes as ``(offsets, lengths)``, or ``None`` if they do not overlap."""
    offs, lens = [], []
    for ao, al, bo, bl in zip(a_off, a_len, b_off, b_len):
        lo, hi = max(ao, bo), min(ao + al, bo + bl)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return tuple(offs), tuple(lens)


class BoxIndex:
    """Finds which of many boxes (a tensor's fragments) overlap a query box, vectorised."""

    def __init__(self, offsets: Sequence[Sequence[int]], lengths: Sequence[Sequence[int]], ndim: int):
        """``offsets``/``lengths``: one row per box (lists, or ``[n, ndim]`` int arrays)."""
        n = len(offsets)
        self._lo = np.asarray(offsets, dtype=np.int64).reshape(n, ndim)
        self._hi = self._lo + np.asarray(lengths, dtype=np.int64).reshape(n, ndim)

    def overlapping(self, off: Sequence[int], length: Sequence[int]) -> list[int]:
        if self._lo.shape[1] == 0:
            return list(range(self._lo.shape[0]))
        q_lo = np.asarray(off, dtype=np.int64)
        q_hi = q_lo + np.asarray(length, dtype=np.int64)
        hit = ((np.minimum(self._hi, q_hi) - np.maximum(self._lo, q_lo)) > 0).all(axis=1)
        return np.flatnonzero(hit).tolist()

    def bounds(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` corners of the boxes ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._lo[rows], self._hi[rows]
