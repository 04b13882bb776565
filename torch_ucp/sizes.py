"""Byte counts for people: one unit rule for summaries, progress bars and log lines."""

from __future__ import annotations

_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


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
