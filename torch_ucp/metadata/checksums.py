"""Checksums of the format: crc32c of metadata objects, block checksums of stored bytes.

Data checksums are one checksum per ``block_bytes`` block of a stored run of bytes (the last
block may be short), so a reader that fetches whole blocks can verify them without reading the
rest. crc32c (Castagnoli; hardware-accelerated by the ``crc32c`` package, several GB/s, and it
releases the GIL) is the default; zlib's crc32 is read for checkpoints that recorded it. The
algorithm is recorded in the header. Metadata objects (header, fragment indexes) always use
crc32c.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import crc32c as _crc32c

_ALGORITHMS: dict[str, Callable[[memoryview], int]] = {"crc32": zlib.crc32, "crc32c": _crc32c.crc32c}

DEFAULT_ALGORITHM = "crc32c"


def crc32c(data: bytes | memoryview) -> int:
    """crc32c (Castagnoli) of ``data``."""
    return _crc32c.crc32c(data)


def checksum_function(algorithm: str) -> Callable[[memoryview], int]:
    try:
        return _ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(
            f"checksum algorithm {algorithm!r} is not known (have {sorted(_ALGORITHMS)})"
        ) from None


def block_checksums(data: memoryview, block_bytes: int, algorithm: str) -> list[int]:
    fn = checksum_function(algorithm)
    return [fn(data[i : i + block_bytes]) for i in range(0, len(data), block_bytes)]
