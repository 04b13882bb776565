"""Streaming data objects: append runs of bytes with their block checksums."""

from __future__ import annotations

from typing import IO

from torch_ucp import knobs
from torch_ucp.metadata.checksums import BlockGrid
from torch_ucp.metadata.schema import ITEM_ALIGNMENT, StoredBytes
from torch_ucp.storage.store import Store, write_all

__all__ = ["ITEM_ALIGNMENT", "ObjectStream", "write_all"]


class ObjectStream:
    """One data object being written: appends runs of bytes, returns where each went.

    Each run starts at a multiple of ``alignment`` bytes (zero bytes fill the gaps), as
    ``UCPWriter`` lays out its data objects (``ITEM_ALIGNMENT``).
    """

    def __init__(self, store: Store, rel: str, alignment: int = 1) -> None:
        self.store = store
        self.rel = rel
        self.alignment = alignment
        self.offset = 0
        self._file: IO[bytes] | None = store.open_write(rel)

    def append(
        self, data: memoryview, grid: BlockGrid | None = None, algorithm: str | None = None
    ) -> StoredBytes:
        """Write ``data`` at the end of the object; with a ``grid`` and an ``algorithm``, with
        the block checksums of the format."""
        assert self._file is not None
        checks = grid.checksums(data, algorithm) if grid is not None and algorithm else []
        pad = -self.offset % self.alignment
        if pad:
            write_all(self._file, memoryview(bytes(pad)))
            self.offset += pad
        # fsspec's buffered files copy whatever is written into their buffer before uploading
        # it: write in buffer-sized pieces so a large tensor is not duplicated in memory.
        step = knobs.write_buffer_bytes()
        for start in range(0, len(data), step):
            write_all(self._file, data[start : start + step])
        stored = StoredBytes(self.rel, self.offset, len(data), tuple(checks))
        self.offset += len(data)
        return stored

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            self.store.close_durably(f)

    def abort(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            self.store.abort_write(f)
