"""PaddedParam: only the first ``size`` entries along a dim are real.

Vocabularies are padded to a multiple of the TP degree; the checkpoint stores the real rows
only, and a load zero-fills whatever padding the target layout has::

    physical (target, padded to 8)   r0 r1 r2 r3 r4 r5 0 0
    logical (stored, size 6)         r0 r1 r2 r3 r4 r5
"""

from __future__ import annotations

from collections.abc import Sequence

from torch_ucp.errors import PatternError
from torch_ucp.patterns.base import DimMap, Pattern, Segment, glob_regex


class PaddedParam(Pattern):
    """Args: ``glob`` of the parameter; ``size`` real entries along ``dim``."""

    kind = "padded"

    def __init__(self, glob: str, size: int, dim: int = 0) -> None:
        self.glob = glob
        self.size = int(size)
        self.dim = dim
        self._regex = glob_regex(glob)

    def __repr__(self) -> str:
        return f"PaddedParam({self.glob!r}, size={self.size}, dim={self.dim})"

    def dim_map(self, fqn: str, shape: Sequence[int], degree: int = 1) -> DimMap:
        if shape[self.dim] < self.size:
            raise PatternError(
                f"{fqn}: {self!r} needs at least {self.size} entries along dim {self.dim}, the "
                f"tensor has shape {list(shape)}"
            )
        return DimMap(self.dim, shape[self.dim], self.size, (Segment(0, 0, self.size),))
