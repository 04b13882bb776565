"""StackedParam: a stacked tensor and per-item tensors are two views of the same data.

``layers.*.experts.w1`` of shape ``[E, ...]`` (possibly sharded over an expert-parallel mesh
dim) and ``layers.*.experts.{i}.w1`` of shape ``[...]``: item ``i`` is index ``i`` of the
stacked tensor along ``dim``. A checkpoint saved in either form loads into the other::

    stacked  w1[E=4, out, in]      per-item  0.w1[out, in]  1.w1  2.w1  3.w1
             |--0--|--1--|--2--|--3--|  <->  each one slice of the stack
"""

from __future__ import annotations

from torch_ucp.errors import PatternError
from torch_ucp.patterns.base import Pattern, glob_regex


class StackedParam(Pattern):
    """Args: ``stacked`` glob, ``per_item`` glob with one ``{i}`` component, stack ``dim``."""

    kind = "stacked"

    def __init__(self, stacked: str, per_item: str, dim: int = 0) -> None:
        if "{i}" not in per_item:
            raise PatternError(f"StackedParam per_item glob needs an {{i}} component: {per_item!r}")
        self.stacked = stacked
        self.per_item = per_item
        self.dim = dim
        self._stacked_regex = glob_regex(stacked)
        self._item_regex = glob_regex(per_item, item=True)
        # the stacked name of an item: the per-item glob with its {i} component removed
        self._item_split = per_item.split(".").index("{i}")

    def __repr__(self) -> str:
        return f"StackedParam({self.stacked!r}, {self.per_item!r}, dim={self.dim})"

    def match_item(self, key: str) -> tuple[str, int] | None:
        """``(stacked key, item index)`` for a per-item key, else ``None``."""
        m = self._item_regex.match(key)
        if m is None:
            return None
        start, end = m.span("item")
        # drop ".{i}" from the key to get the stacked key
        stacked = key[: start - 1] + key[end:]
        if not self._stacked_regex.match(stacked):
            return None
        return stacked, int(m.group("item"))

    def match_stacked(self, key: str) -> bool:
        return self._stacked_regex.match(key) is not None

    def item_key(self, stacked_key: str, index: int) -> str:
        """The per-item key of ``index`` for a stacked key (inverse of :meth:`match_item`)."""
        m = self._stacked_regex.match(stacked_key)
        assert m is not None
        param = m.group("param")
        comps = param.split(".")
        n_glob = len(self.stacked.split("."))
        if n_glob != len(comps):  # ** in the glob: insert before the last component
            insert_at = len(comps) - (len(self.per_item.split(".")) - 1 - self._item_split)
        else:
            insert_at = self._item_split
        comps.insert(insert_at, str(index))
        start, end = m.span("param")
        return stacked_key[:start] + ".".join(comps) + stacked_key[end:]


