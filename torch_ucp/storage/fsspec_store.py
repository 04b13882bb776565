"""Object stores and every other fsspec filesystem (``s3://``, ``gs://``, ``memory://`` ...).

Ranged reads go through ``cat_ranges`` (run in parallel by the read engine), writes are streamed
(multipart uploads on S3, one part per ``write_buffer_bytes``) and published with a single PUT,
which is atomic. Every operation is retried on transient errors, bounded in attempts and time
(:mod:`torch_ucp.storage.retry`); the object store's response, not the recorded length, sizes a
read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, TypeVar

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.storage.retry import error_code, retry
from torch_ucp.storage.store import Store, short_read

T = TypeVar("T")


class FsspecStore(Store):
    """A checkpoint prefix on an object store (or any fsspec filesystem)."""

    @property
    def default_write_threads(self) -> int:
        return knobs.remote_write_threads()

    def retrying(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        return retry(fn, what, on_retry=on_retry)

    def read_bytes(self, rel: str, max_bytes: int | None = None, *, limit_knob: str = "") -> bytes:
        """At most ``max_bytes + 1`` bytes are fetched, so an oversized object costs no memory."""
        end = None if max_bytes is None else max_bytes + 1
        data = self.retrying(
            lambda: self.fs.cat_file(self.path(rel), start=0 if end else None, end=end),
            f"reading {self.describe(rel)}",
        )
        self._check_limit(rel, len(data), max_bytes, limit_knob, exact=False)
        return data

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        if length == 0:
            return b""
        (blob,) = self._fetch(rel, [(start, length)], f"reading {self.describe(rel)}")
        return blob

    def read_into(self, rel: str, ranges: Sequence[tuple[int, int]], outs: Sequence[memoryview]) -> None:
        blobs = self._fetch(rel, ranges, f"reading {len(ranges)} ranges of {self.describe(rel)}")
        for blob, out in zip(blobs, outs):
            out[:] = blob

    def _fetch(self, rel: str, ranges: Sequence[tuple[int, int]], what: str) -> list[bytes]:
        path = self.path(rel)

        def fetch() -> list[bytes]:
            try:
                return self.fs.cat_ranges(
                    [path] * len(ranges),
                    [s for s, _ in ranges],
                    [s + n for s, n in ranges],
                    on_error="raise",
                )
            except FileNotFoundError as e:
                raise CorruptCheckpointError(f"data object {self.describe(rel)} is missing") from e
            except OSError as e:
                if error_code(e) == "InvalidRange":  # S3: the range starts past the end
                    raise short_read(self.describe(rel), ranges[0][0], ranges[0][1], 0) from e
                raise

        blobs = self.retrying(fetch, what)
        for (start, length), blob in zip(ranges, blobs):
            if len(blob) != length:
                raise short_read(self.describe(rel), start, length, len(blob))
        return blobs

    def open_write(self, rel: str) -> IO[bytes]:
        return self.fs.open(self.path(rel), "wb", block_size=knobs.write_buffer_bytes())

    def abort_write(self, f: IO[bytes]) -> None:
        """Abort a multipart upload: nothing is published."""
        discard = getattr(f, "discard", None)  # fsspec's buffered files: abort the upload
        try:
            (discard or f.close)()
        except Exception:  # noqa: BLE001 - best effort, the original error matters
            pass

    def write_atomic(self, rel: str, data: bytes) -> None:
        """One PUT: readers see the old or the new object, never a part."""
        self.retrying(lambda: self.fs.pipe_file(self.path(rel), data), f"writing {self.describe(rel)}")
