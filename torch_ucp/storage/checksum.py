"""Block checksums of fragment bytes.

One checksum per ``block_bytes`` block of a stored run of bytes (the last block may be short),
so a reader that fetches whole blocks can verify them without reading the rest. crc32c (with
hardware support, several GB/s) is used where the ``crc32c`` package is installed; zlib's crc32
otherwise. The algorithm is recorded in the metadata.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

try:
    import crc32c as _crc32c
except ImportError:  # pragma: no cover - crc32c is a declared dependency
    _crc32c = None

_ALGORITHMS: dict[str, Callable[[memoryview], int]] = {"crc32": zlib.crc32}
if _crc32c is not None:
    _ALGORITHMS["crc32c"] = _crc32c.crc32c

DEFAULT_ALGORITHM = "crc32c" if _crc32c is not None else "crc32"


def checksum_function(algorithm: str) -> Callable[[memoryview], int]:
    try:
        return _ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(
            f"checksum algorithm {algorithm!r} is not available here (have {sorted(_ALGORITHMS)});"
            " install the `crc32c` package or load with verify=False"
        ) from None


def block_checksums(data: memoryview, block_bytes: int, algorithm: str) -> list[int]:
    fn = checksum_function(algorithm)
    return [fn(data[i : i + block_bytes]) for i in range(0, len(data), block_bytes)]
