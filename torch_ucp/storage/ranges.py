"""From "this box of that fragment" to byte ranges: read only what is needed.

A fragment is stored C-contiguous, so a sub-box of it is a regular grid of contiguous runs.
:func:`plan_box_ranges` picks how many leading dimensions to enumerate: one range per index
tuple of those dimensions, each spanning the rest of the box. Zero dimensions means one range
bounding the whole box; more dimensions means more, tighter ranges. It takes the fewest ranges
whose total stays within ``(1 + waste_ratio)`` of the bytes needed::

    fragment 4 x 8, box rows 1..2, cols 2..5        d = 0: one range, (1,2) to (2,5): 12 for 8 (1.5x)
    . . . . . . . .                                 d = 1: two ranges of 4 elements (exact)
    . . X X X X . .
    . . X X X X . .
    . . . . . . . .

The ranges read into one packed buffer, which a single ``as_strided`` view maps back onto the box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


@dataclass(frozen=True)
class BoxRanges:
    """Byte ranges covering a sub-box of a fragment, relative to the fragment's first byte.

    ``starts`` (numpy int64) are the range starts, each ``span`` bytes long; read in order into
    a packed buffer, the box is ``buffer.view(dtype).as_strided(lengths, view_strides, offset)``.
    """

    starts: np.ndarray
    span: int
    view_strides: tuple[int, ...]
    view_offset: int

    @property
    def total(self) -> int:
        return int(self.starts.size) * self.span


def plan_box_ranges(
    fragment_shape: Sequence[int],
    offsets: Sequence[int],
    lengths: Sequence[int],
    itemsize: int,
    waste_ratio: float,
) -> BoxRanges:
    """Fewest byte ranges reading the box within ``(1 + waste_ratio)`` of its size."""
    n = len(fragment_shape)
    st = c_strides(fragment_shape)
    needed = math.prod(lengths)
    base = sum(o * s for o, s in zip(offsets, st))
    if needed == 0:
        return BoxRanges(np.zeros(0, dtype=np.int64), 0, tuple(st), 0)
    budget = (1.0 + waste_ratio) * needed
    for d in range(n + 1):
        span = 1 + sum((lengths[k] - 1) * st[k] for k in range(d, n))
        count = math.prod(lengths[:d])
        if count * span <= budget or d == n:
            break
    grid = np.zeros(1, dtype=np.int64)
    for k in range(d):
        grid = (grid[:, None] + np.arange(lengths[k], dtype=np.int64) * st[k]).reshape(-1)
    starts = (grid + base) * itemsize
    packed = []
    acc = span
    for k in reversed(range(d)):
        packed.append(acc)
        acc *= lengths[k]
    view_strides = tuple(reversed(packed)) + tuple(st[d:])
    return BoxRanges(starts, span * itemsize, view_strides, 0)


def block_aligned_bounds(
    start: int, end: int, block: int, limit: int
) -> tuple[int, int]:
    """``[start, end)`` widened to whole checksum blocks, clipped at the fragment end ``limit``."""
    return (start // block) * block, min(-(-end // block) * block, limit)
