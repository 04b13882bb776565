"""The pattern language: parameters whose sharded layout is not a plain slice of the logical
tensor (fused QKV / gate-up interleaved per TP rank, padded vocabularies, stacked vs per-expert
MoE weights, renamed FQNs) reshard correctly at load time. See docs/PATTERNS.md.

Pass patterns to ``UCPSavePlanner(patterns=[...])`` (they are recorded in the checkpoint) and
to ``UCPLoadPlanner(patterns=[...])`` (default: the recorded ones); describe a stock DCP
checkpoint saved without them with ``UCPLoadPlanner(saved_patterns=[...])``.
"""

from torch_ucp.patterns.base import DimMap, Pattern, Segment
from torch_ucp.patterns.engine import PatternError, PatternSet
from torch_ucp.patterns.fused import FusedParam
from torch_ucp.patterns.padded import PaddedParam
from torch_ucp.patterns.rename import Rename
from torch_ucp.patterns.stacked import StackedParam

__all__ = [
    "DimMap",
    "FusedParam",
    "PaddedParam",
    "Pattern",
    "PatternError",
    "PatternSet",
    "Rename",
    "Segment",
    "StackedParam",
]
