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

import re
from typing import Any, ClassVar

from torch_ucp.metadata.schema import DimMap, Segment

__all__ = ["DimMap", "Pattern", "Segment", "glob_regex"]

_REGISTRY: dict[str, type[Pattern]] = {}


def glob_regex(glob: str, *, item: bool = False) -> re.Pattern[str]:
    parts = []
    for comp in glob.split("."):
        if comp == "**":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)")
            continue
        out = ""
        for token in re.split(r"(\*|\{i\})", comp):
            if token == "*":
                out += r"[^.]*"
            elif token == "{i}":
                if not item:
                    raise ValueError(f"{{i}} is only allowed in StackedParam globs: {glob!r}")
                out += r"(?P<item>\d+)"
            else:
                out += re.escape(token)
        parts.append(out)
    body = r"\.".join(parts)
    return re.compile(rf"(?:^|^.*\.)(?P<param>{body})(?P<state>\.[^.]+)?$")


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
            raise ValueError(f"unknown pattern kind {kind!r} (known: {sorted(_REGISTRY)})") from None
        return cls(**d)
