"""FusedParam: sub-parameters concatenated along a dim, interleaved per tensor-parallel rank.

A fused QKV weight with parts ``(q, k, v)`` sharded over TP degree ``T`` holds on TP rank
``t`` its own slice of every part, so the DTensor's global view (what ``full_tensor()``
returns) is the rank-interleaved concatenation; the stored logical tensor is the plain one::

    parts (q=4, k=2, v=2), T=2           physical (DTensor view)    logical (stored)
    rank 0 holds q0 q1 k0 v0             q0 q1 k0 v0 | q2 q3 k1 v1  q0 q1 q2 q3 k0 k1 v0 v1
    rank 1 holds q2 q3 k1 v1             '--- t=0 --'  '--- t=1 --'

Physical block ``t``, part ``j`` (length ``parts[j] / T``) is logical ``cum[j] + t*parts[j]/T``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch_ucp.errors import PatternError
from torch_ucp.patterns.base import DimMap, Pattern, Segment, glob_regex


class FusedParam(Pattern):
    """Parameters whose ``dim`` concatenates ``parts`` and whose shards over mesh dimension
    ``mesh_dim`` each hold their own slice of every part (Megatron-style interleaving).

    Args:
        glob: FQN glob of the parameter (its optimizer states follow).
        parts: sizes of the sub-parameters along ``dim`` (e.g. q, k, v with GQA; gate, up).
        dim: the fused dimension.
        mesh_dim: name of the tensor-parallel mesh dimension; its size is the interleave degree.
        degree: the interleave degree when the tensor carries no mesh (a stock DCP checkpoint
            described by ``saved_patterns``); otherwise read from the DTensor's mesh.
    """

    kind = "fused"

    def __init__(
        self,
        glob: str,
        parts: Sequence[int],
        dim: int = 0,
        mesh_dim: str = "tp",
        degree: int | None = None,
    ) -> None:
        self.glob = glob
        self.parts = tuple(int(p) for p in parts)
        self.dim = dim
        self.mesh_dim = mesh_dim
        self.degree = degree
        self._regex = glob_regex(glob)

    def __repr__(self) -> str:
        return f"FusedParam({self.glob!r}, parts={list(self.parts)}, dim={self.dim}, mesh_dim={self.mesh_dim!r})"

    def dim_map(self, fqn: str, shape: Sequence[int], degree: int) -> DimMap:
        total = sum(self.parts)
        if shape[self.dim] != total:
            raise PatternError(
                f"{fqn}: {self!r} expects size {total} (= sum of parts {list(self.parts)}) along "
                f"dim {self.dim}, the tensor has shape {list(shape)}"
            )
        bad = [p for p in self.parts if p % degree]
        if bad:
            raise PatternError(
                f"{fqn}: cannot interleave parts {list(self.parts)} over {self.mesh_dim} degree "
                f"{degree}: parts {bad} are not divisible by {degree}"
            )
        segments = []
        block = total // degree
        for t in range(degree):
            inner = 0
            logical = 0
            for p in self.parts:
                n = p // degree
                segments.append(Segment(t * block + inner, logical + t * n, n))
                inner += n
                logical += p
        return DimMap(self.dim, total, total, tuple(segments))
