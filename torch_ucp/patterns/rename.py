"""Rename: a regex mapping from the names a rank's state dict uses to the checkpoint's names.

Applied at save time (local -> stored) and at load time (target -> stored), to every key, so
``module.`` / ``_orig_mod.`` prefixes and pipeline stages that number their layers locally
line up::

    Rename(r"_orig_mod\\.", "")                       _orig_mod.layers.0.w  ->  layers.0.w
    Rename(r"layers\\.(\\d+)", lambda m: f"layers.{int(m[1]) + 4}")   (stage 1 of 4 layers each)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch_ucp.patterns.base import Pattern


class Rename(Pattern):
    """Args: ``pattern`` (regex, searched anywhere in the key) and ``replacement`` (a
    ``re.sub`` template, or a function of the match; functions are not recorded in metadata)."""

    kind = "rename"

    def __init__(self, pattern: str, replacement: str | Callable[[re.Match[str]], str]) -> None:
        self.pattern = pattern
        self.replacement = replacement
        self._regex = re.compile(pattern)

    def __repr__(self) -> str:
        return f"Rename({self.pattern!r}, {self.replacement!r})"

    def to_json(self) -> dict:
        rep = self.replacement if isinstance(self.replacement, str) else "<function>"
        return {"kind": self.kind, "pattern": self.pattern, "replacement": rep}

    def apply(self, key: str) -> str:
        return self._regex.sub(self.replacement, key)

    def matches(self, key: str) -> bool:
        return self._regex.search(key) is not None
