"""Write safetensors files tensor by tensor, holding none of them (``torch-ucp export``).

The ``safetensors`` library's ``save_file`` needs every tensor of a file in memory at once;
:class:`SafetensorsFileWriter` lays the header out up front from the names, dtypes and shapes,
then streams each tensor's bytes in that order, so an export of any size holds one tensor plus
a write buffer. The file format is the one :mod:`torch_ucp.interop.safetensors` reads.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch

from torch_ucp.interop.safetensors import safetensors_dtype_name
from torch_ucp.metadata.raw_bytes import tensor_bytes
from torch_ucp.storage.objects import ObjectStream
from torch_ucp.storage.store import Store

__all__ = ["SafetensorsFileWriter"]


class SafetensorsFileWriter:
    """Writes one safetensors file tensor by tensor, holding none of them.

    The header (names, dtypes, shapes and byte offsets) is laid out up front from ``layout``,
    so the tensors can then be streamed in that order with :meth:`write`, each released by the
    caller once written: peak memory is one tensor plus a write buffer (the ``safetensors``
    library's ``save_file`` needs every tensor of the file in memory at once). The header is
    padded with spaces to a multiple of 8 bytes, as the ``safetensors`` library writes it.

    Args:
        store: where to write (local folder or any fsspec URL).
        rel: the file name relative to ``store``.
        layout: ``(name, dtype, shape)`` of every tensor, in file order.
        metadata: the ``__metadata__`` strings (Hugging Face expects ``{"format": "pt"}``).
    """

    def __init__(
        self,
        store: Store,
        rel: str,
        layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.rel = rel
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dtype, shape in layout:
            if name in header:
                raise ValueError(f"{store.describe(rel)}: tensor name {name!r} appears twice")
            shape = tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": safetensors_dtype_name(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout.append((name, dtype, shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.nbytes = len(self.header) + offset
        self._stream: ObjectStream | None = None
        self._next = 0

    def open(self) -> SafetensorsFileWriter:
        self._stream = ObjectStream(self.store, self.rel)
        self._stream.append(memoryview(self.header))
        return self

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor (in layout order); returns the bytes written."""
        if self._stream is None:
            raise RuntimeError(f"{self.store.describe(self.rel)} is not open")
        if self._next >= len(self._layout):
            raise ValueError(f"{self.store.describe(self.rel)}: {name!r} is not in the layout")
        expected, dtype, shape = self._layout[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.store.describe(self.rel)}: expected {expected!r} {dtype} {list(shape)} "
                f"next, got {name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        stored = self._stream.append(tensor_bytes(tensor))
        self._next += 1
        return stored.byte_length

    def close(self) -> None:
        """Finish the file durably; every tensor of the layout must have been written."""
        if self._stream is None:
            return
        if self._next != len(self._layout):
            missing = [n for n, _, _ in self._layout[self._next :]]
            self.abort()
            raise ValueError(f"{self.store.describe(self.rel)}: never written: {missing[:5]}")
        stream, self._stream = self._stream, None
        stream.close()

    def abort(self) -> None:
        """Give the file up: nothing of it is left (a local file is written in place, so the
        part written is removed; an object store publishes nothing)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()
            try:
                if self.store.exists(self.rel):
                    self.store.remove(self.rel)
            except Exception:  # noqa: BLE001 - best effort; the error that aborted it matters
                pass

    def __enter__(self) -> SafetensorsFileWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
