"""Streaming data objects: append runs of bytes with their block checksums."""

from __future__ import annotations

from typing import IO, Any

from torch_ucp import knobs
from torch_ucp.metadata.schema import StoredBytes
from torch_ucp.storage.checksum import BlockGrid
from torch_ucp.storage.store import Store

ITEM_ALIGNMENT = 64  # bytes; every item in a data object starts at a multiple of this


def write_all(f: Any, data: memoryview) -> None:
    """Write all of ``data`` (raw file objects may write less than asked)."""
    view = data
    while len(view):
        n = f.write(view)
        if n is None or n == len(view):  # buffered streams write everything
            return
        view = view[n:]


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
