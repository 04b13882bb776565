"""Names of objects inside a checkpoint folder: relative, no ``..``, a safe alphabet."""

from __future__ import annotations

import re
from typing import Any

_SAFE_OBJECT_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def check_object_name(name: Any) -> str:
    """``name`` if it is a relative path inside the checkpoint folder, else ``ValueError``."""
    if (
        not isinstance(name, str)
        or len(name) > 1024
        or not _SAFE_OBJECT_NAME.fullmatch(name)
        or any(part in (".", "..") for part in name.split("/"))
    ):
        raise ValueError(f"data object name {name!r} is not a relative path inside the checkpoint")
    return name
