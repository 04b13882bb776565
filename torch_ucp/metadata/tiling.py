"""Do fragments tile a box exactly: every element covered once, no gap, no overlap?

Fragments come from metadata that may be damaged or edited. A gap would leave the target's old
values in place and an overlap would make the result depend on read order, so both are refused.
The check compresses the box onto the distinct fragment edges along each dim (a grid of cells)
and counts how often each cell is covered with an n-dimensional difference array: linear in
fragments x 2^ndim plus the number of cells. Pathological edge sets (more cells than
``max_cells``) fall back to a pairwise disjointness test in blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_CELLS = 1 << 22


def tiling_problem(
    lo: np.ndarray,
    hi: np.ndarray,
    box_lo: Sequence[int],
    box_hi: Sequence[int],
    *,
    max_cells: int = MAX_CELLS,
) -> str | None:
    """``None`` if the boxes ``[lo, hi)`` (``[k, ndim]``) clipped to ``[box_lo, box_hi)`` cover
    it exactly once; else a short description of the first gap or overlap."""
    box_lo = np.asarray(box_lo, dtype=np.int64)
    box_hi = np.asarray(box_hi, dtype=np.int64)
    ndim = len(box_lo)
    if ndim == 0:  # a scalar: exactly one fragment
        n = len(lo)
        return None if n == 1 else ("no fragment" if n == 0 else f"{n} overlapping fragments")
    volume = int(np.prod(box_hi - box_lo))
    lo = np.maximum(np.asarray(lo, dtype=np.int64).reshape(-1, ndim), box_lo)
    hi = np.minimum(np.asarray(hi, dtype=np.int64).reshape(-1, ndim), box_hi)
    keep = (hi > lo).all(axis=1)
    lo, hi = lo[keep], hi[keep]
    if volume == 0:
        return None
    covered = int(np.prod(hi - lo, axis=1).sum())
    if len(lo) == 0:
        return f"no fragment covers [{_fmt(box_lo)}, {_fmt(box_hi)})"
    edges = [np.unique(np.concatenate([[box_lo[d], box_hi[d]], lo[:, d], hi[:, d]])) for d in range(ndim)]
    cells = math.prod(len(e) - 1 for e in edges)
    if cells <= max_cells:
        counts = np.zeros([len(e) for e in edges], dtype=np.int64)
        a = [np.searchsorted(edges[d], lo[:, d]) for d in range(ndim)]
        b = [np.searchsorted(edges[d], hi[:, d]) for d in range(ndim)]
        for corner in range(1 << ndim):  # inclusion-exclusion of the 2^ndim corners
            index = tuple(b[d] if corner >> d & 1 else a[d] for d in range(ndim))
            sign = -1 if bin(corner).count("1") % 2 else 1
            np.add.at(counts, index, sign)
        for d in range(ndim):
            np.cumsum(counts, axis=d, out=counts)
        counts = counts[tuple(slice(0, len(e) - 1) for e in edges)]
        bad = np.argwhere(counts != 1)
        if len(bad) == 0:
            return None
        at = [int(edges[d][bad[0][d]]) for d in range(ndim)]
        n = int(counts[tuple(bad[0])])
        what = "a gap" if n == 0 else f"{n} fragments overlap"
        return f"{what} at [{_fmt(at)}] ({covered} of {volume} elements covered)"
    if covered < volume:
        return f"a gap: {covered} of {volume} elements covered"
    # as many elements covered as the box holds: exact iff pairwise disjoint
    block = max(1, (1 << 24) // max(len(lo), 1))
    for s in range(0, len(lo), block):
        overlap = ((np.minimum(hi[s : s + block, None], hi[None]) - np.maximum(lo[s : s + block, None], lo[None])) > 0).all(axis=2)
        overlap[np.arange(overlap.shape[0]), np.arange(s, s + overlap.shape[0])] = False
        hit = np.argwhere(overlap)
        if len(hit):
            i = s + int(hit[0][0])
            return f"fragments at [{_fmt(lo[i])}] and [{_fmt(lo[int(hit[0][1])])}] overlap"
    return None if covered == volume else f"{covered} of {volume} elements covered"


def _fmt(v) -> str:
    return ", ".join(str(int(x)) for x in v)
