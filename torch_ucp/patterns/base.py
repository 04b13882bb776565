"""What every pattern shares: FQN globs, JSON round trip, and the index maps along one dim.

Glob syntax: dotted FQN components; ``*`` matches within one component, ``**`` any number of
components, ``{i}`` (stacked patterns only) one integer component captured as the item index.
A glob matches a flattened state-dict key when it matches the key's tail at a component
boundary, optionally followed by one more component: so ``layers.*.attention.wqkv.weight``
matches ``model.layers.0.attention.wqkv.weight`` and every optimizer state of that parameter,
whatever the optimizer calls it (``optim.state.layers.0.attention.wqkv.weight.exp_avg``,
``...momentum_buffer``), but not ``...wqkv.weight_scale``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch_ucp.errors import PatternError
from torch_ucp.metadata.schema import DimMap, Segment

__all__ = ["DimMap", "Pattern", "Segment", "glob_regex"]

_REGISTRY: dict[str, type[Pattern]] = {}


_DOUBLE = "**"
_ITEM = "{i}"


class _Component:
    """One dotted component of a glob: literal text and ``*`` (anything but a dot); matched by
    anchored literal segments, the leftmost fit for each middle one (no backtracking)."""

    def __init__(self, text: str) -> None:
        self.segments = text.split("*")

    def matches(self, comp: str) -> bool:
        segs = self.segments
        if len(segs) == 1:
            return comp == segs[0]
        head, tail = segs[0], segs[-1]
        if len(comp) < len(head) + len(tail) or not comp.startswith(head) or not comp.endswith(tail):
            return False
        at, end = len(head), len(comp) - len(tail)
        for seg in segs[1:-1]:
            found = comp.find(seg, at, end)
            if found < 0:
                return False
            at = found + len(seg)
        return True


class GlobMatch:
    """Where a glob matched a key: ``span``/``group`` of ``"param"`` (the matched tail),
    ``"state"`` (the optional extra component, with its dot) and ``"item"`` (``{i}``)."""

    def __init__(self, key: str, spans: dict[str, tuple[int, int] | None]) -> None:
        self.string = key
        self._spans = spans

    def span(self, name: str) -> tuple[int, int]:
        return self._spans.get(name) or (-1, -1)

    def group(self, name: str) -> str | None:
        span = self._spans.get(name)
        return None if span is None else self.string[span[0] : span[1]]


class Glob:
    """A compiled FQN glob (module docstring). ``match(key)`` runs in ``O(components of the
    glob x components of the key)`` steps per candidate start, whatever the glob: a glob read
    from a checkpoint cannot make matching take exponential time."""

    def __init__(self, glob: str, *, item: bool = False) -> None:
        self.pattern = glob
        self._parts: list[str | _Component] = []
        for comp in glob.split("."):
            if comp == _DOUBLE:
                self._parts.append(_DOUBLE)
            elif _ITEM in comp:
                if not item:
                    raise PatternError(f"{{i}} is only allowed in StackedParam globs: {glob!r}")
                if comp != _ITEM or _ITEM in self._parts:
                    raise PatternError(f"{{i}} must be one whole component, once: {glob!r}")
                self._parts.append(_ITEM)
            else:
                self._parts.append(_Component(comp))

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"

    def _comp_ok(self, part: str | _Component, comp: str) -> bool:
        if part == _ITEM:
            return comp.isdecimal()
        return part.matches(comp)  # type: ignore[union-attr]

    def match(self, key: str) -> GlobMatch | None:
        comps = key.split(".")
        n, g = len(comps), len(self._parts)
        starts = [0]
        for c in comps[:-1]:
            starts.append(starts[-1] + len(c) + 1)
        ends = {n} | ({n - 1} if n > 1 and comps[-1] else set())  # param end: key end, or one
        memo: dict[tuple[int, int], bool] = {}  # state component after it

        def feasible(gi: int, ki: int) -> bool:
            if gi == g:
                return ki in ends
            hit = memo.get((gi, ki))
            if hit is None:
                part = self._parts[gi]
                if part == _DOUBLE:  # one or more non-empty components
                    hit = False
                    k = ki
                    while k < n and comps[k]:
                        k += 1
                        if feasible(gi + 1, k):
                            hit = True
                            break
                else:
                    hit = ki < n and self._comp_ok(part, comps[ki]) and feasible(gi + 1, ki + 1)
                memo[(gi, ki)] = hit
            return hit

        # the start the regex form tried first: the whole key, then the latest component first
        for s in [0, *range(n - 1, 0, -1)]:
            if feasible(0, s):
                return self._spans(key, comps, starts, s, feasible)
        return None

    def _spans(self, key: str, comps: list[str], starts: list[int], s: int, feasible) -> GlobMatch:
        """The match from start ``s``, each ``**`` as long as possible (as a greedy regex)."""
        n, item, ki = len(comps), None, s
        for gi, part in enumerate(self._parts):
            if part == _DOUBLE:
                k, longest = ki, ki
                while k < n and comps[k]:
                    k += 1
                    if feasible(gi + 1, k):
                        longest = k
                ki = longest
            else:
                if part == _ITEM:
                    item = (starts[ki], starts[ki] + len(comps[ki]))
                ki += 1
        param = (starts[s], starts[ki - 1] + len(comps[ki - 1]))
        state = (param[1], len(key)) if ki == n - 1 else None
        return GlobMatch(key, {"param": param, "state": state, "item": item})


def glob_regex(glob: str, *, item: bool = False) -> Glob:
    """The compiled glob (``item``: ``{i}`` allowed); ``.match(key)`` as for a regex."""
    return Glob(glob, item=item)


class Pattern:
    """Base class: a declarative layout rule, recorded in checkpoint metadata as JSON."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.kind] = cls

    def to_json(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        return {"kind": self.kind, **{k: v for k, v in d.items() if not k.startswith("_")}}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Pattern:
        d = dict(d)
        kind = d.pop("kind")
        try:
            cls = _REGISTRY[kind]
        except KeyError:
            raise PatternError(f"unknown pattern kind {kind!r} (known: {sorted(_REGISTRY)})") from None
        return cls(**d)
