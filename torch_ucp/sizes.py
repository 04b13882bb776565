"""Byte counts for people: one unit rule for summaries, progress bars and log lines."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))

#: the units :func:`parse_size` accepts (upper case): decimal KB/MB/GB/TB as in Hugging Face's
#: ``max_shard_size``, binary KiB/MiB/GiB/TiB and K/M/G.
_PARSE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30,
}


def byte_unit(n: int | None) -> tuple[str, int]:
    """The unit :func:`human_bytes` writes ``n`` in: ``("MiB", 2**20)`` for 192 MiB."""
    for unit, size in _UNITS:
        if n is not None and n >= size:
            return unit, size
    return "B", 1


def human_bytes(n: int | None) -> str:
    """``201326592`` -> ``"192.00 MiB"``; ``None`` -> ``"?"``."""
    if n is None:
        return "?"
    unit, size = byte_unit(n)
    return f"{n} B" if size == 1 else f"{n / size:.2f} {unit}"


def rate(nbytes: int, seconds: float) -> str:
    """Throughput in decimal GB/s, as storage bandwidth is quoted."""
    return f"{nbytes / max(seconds, 1e-9) / 1e9:.2f} GB/s"


def parse_size(text: str) -> int:
    """``"500MB"`` -> 500_000_000, ``"2GiB"`` -> 2 * 2**30, ``"1024"`` -> 1024; ``ValueError``
    for anything else, and for a size that is not positive."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _PARSE_UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 500MB, 2GB, 1GiB or bytes")
    size = int(Fraction(m.group(1)) * _PARSE_UNITS[unit])  # exact: a float made "2.01KB" 2009 bytes
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size
