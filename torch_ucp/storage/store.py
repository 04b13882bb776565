"""A checkpoint root on any fsspec filesystem, with fast paths for local disk and NFS.

Local paths use positional reads (``os.preadv``) straight into destination memory and
unbuffered writes of tensor memory, fsyncing files and directories where durability matters.
Any other fsspec URL (``s3://``, ``gs://``, ``memory://`` ...) goes through fsspec: streamed
writes (multipart uploads on S3) and parallel ranged reads.

A :class:`Store` is picklable: it keeps only the URL and options and re-opens the filesystem
lazily, so writers and readers can be shipped to DCP's async-save process.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.storage.retry import retry

T = TypeVar("T")


class Store:
    """Reads and writes objects relative to a checkpoint root URL."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    # -- filesystem ---------------------------------------------------------------------------
    def _open_fs(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._fs, self._root = fs, root.rstrip("/") or root

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._open_fs()
        return self._fs  # type: ignore[return-value]

    @property
    def root(self) -> str:
        if self._root is None:
            self._open_fs()
        return self._root  # type: ignore[return-value]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def retrying(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """Run ``fn`` with bounded retries of transient errors on remote stores.

        Local disk errors are not transient (a full disk stays full), so they fail at once.
        """
        if self.is_local:
            return fn()
        return retry(fn, what, on_retry=on_retry)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def describe(self, rel: str) -> str:
        """A user-facing name of an object: the checkpoint URL joined with ``rel``."""
        return posixpath.join(self.url.rstrip("/"), rel)

    # -- reads --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        def exists() -> bool:
            self.fs.invalidate_cache(self.path(rel))  # other ranks/processes may have written it
            return self.fs.exists(self.path(rel))

        return self.retrying(exists, f"checking {self.describe(rel)}")

    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """The whole object ``rel``; with ``limit``, at most ``limit + 1`` bytes are read (a
        longer object is the caller's error to report, with bounded memory)."""
        end = None if limit is None else limit + 1
        return self.retrying(
            lambda: self.fs.cat_file(self.path(rel), start=0 if end else None, end=end),
            f"reading {self.describe(rel)}",
        )

    def read_many(self, rels: Sequence[str], limits: Sequence[int]) -> list[bytes]:
        """Whole objects, read in parallel (metadata objects: small, many), each at most its
        ``limit + 1`` bytes."""
        if len(rels) <= 1:
            return [self.read_bytes(r, n) for r, n in zip(rels, limits)]
        with ThreadPoolExecutor(min(len(rels), knobs.read_threads()), "ucp-meta") as pool:
            return list(pool.map(self.read_bytes, rels, limits))

    def read_into(self, rel: str, ranges: Sequence[tuple[int, int]], outs: Sequence[memoryview]) -> None:
        """Read each ``(start, length)`` range of ``rel`` into the matching writable buffer."""
        if self.is_local:
            self._read_into_local(rel, ranges, outs)
            return
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
                if _error_code(e) == "InvalidRange":  # S3: the range starts past the end
                    raise _short_read(self.describe(rel), ranges[0][0], ranges[0][1], 0) from e
                raise

        blobs = self.retrying(fetch, f"reading {len(ranges)} ranges of {self.describe(rel)}")
        for (start, length), blob, out in zip(ranges, blobs, outs):
            if len(blob) != length:
                raise _short_read(self.describe(rel), start, length, len(blob))
            out[:] = blob

    def _read_into_local(
        self, rel: str, ranges: Sequence[tuple[int, int]], outs: Sequence[memoryview]
    ) -> None:
        try:
            fd = os.open(self.path(rel), os.O_RDONLY)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"data object {self.describe(rel)} is missing") from e
        try:
            for (start, length), out in zip(ranges, outs):
                done = 0
                while done < length:
                    n = os.preadv(fd, [out[done:]], start + done)
                    if n == 0:
                        raise _short_read(self.describe(rel), start, length, done)
                    done += n
        finally:
            os.close(fd)

    # -- writes -------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def open_write(self, rel: str) -> IO[bytes]:
        """A binary stream creating ``rel``; call :meth:`close_durably` when done."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            return _LocalWriter(self.path(rel))
        return self.fs.open(self.path(rel), "wb", block_size=knobs.write_buffer_bytes())

    def abort_write(self, f: IO[bytes]) -> None:
        """Give up a stream from :meth:`open_write`: abort a multipart upload (nothing is
        published); on local disk the partial file stays until the next save cleans it up."""
        discard = getattr(f, "discard", None)
        try:
            if discard is not None and not self.is_local:
                discard()
            else:
                f.close()
        except Exception:  # noqa: BLE001 - best effort, the original error matters
            pass

    def close_durably(self, f: IO[bytes]) -> None:
        """Close a stream from :meth:`open_write` with its bytes on stable storage.

        Local: fsync the file. Object stores: close completes the (multipart) upload, after
        which the object is durable.
        """
        if self.is_local:
            f.flush()
            os.fsync(f.fileno())
        f.close()

    def fsync_dir(self, rel: str) -> None:
        """Make directory entries (new files, renames) durable on local disk and NFS."""
        if not self.is_local:
            return
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_object(self, rel: str, data: bytes) -> None:
        """Write a whole object durably (a new name: no atomic replace needed)."""
        f = self.open_write(rel)
        try:
            write_all(f, memoryview(data))
        except BaseException:
            self.abort_write(f)
            raise
        self.close_durably(f)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Publish ``rel`` so that readers see either nothing, the old or the new bytes.

        Local disk and NFS: write a unique temporary, fsync, rename over ``rel``, fsync the
        directory (rename is atomic there). Object stores: a single PUT, which is atomic.
        """
        if not self.is_local:
            self.retrying(lambda: self.fs.pipe_file(self.path(rel), data), f"writing {self.describe(rel)}")
            return
        final = self.path(rel)
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.fsync_dir(posixpath.dirname(rel))

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        def ls() -> list[str]:
            try:
                self.fs.invalidate_cache(self.path(rel))
                return self.fs.ls(self.path(rel), detail=False)
            except FileNotFoundError:
                return []

        entries = self.retrying(ls, f"listing {self.describe(rel)}")
        return [posixpath.basename(e.rstrip("/")) for e in entries]

    def remove(self, rel: str) -> None:
        """Delete an object or a folder of objects, ignoring what is already gone."""
        def rm() -> None:
            try:
                self.fs.rm(self.path(rel), recursive=True)
            except FileNotFoundError:
                pass

        self.retrying(rm, f"removing {self.describe(rel)}")


def write_all(f: Any, data: memoryview) -> None:
    """Write all of ``data`` (raw file objects may write less than asked)."""
    view = data
    while len(view):
        n = f.write(view)
        if n is None or n == len(view):  # buffered streams write everything
            return
        view = view[n:]


class _LocalWriter:
    """Unbuffered writes of tensor memory to a local file, starting writeback as it goes.

    Every ``writeback_chunk_bytes`` the written range is handed to the kernel for writeback
    (``POSIX_FADV_DONTNEED`` starts it asynchronously and drops the pages once clean), so disk
    writes overlap the copying and the closing fsync finds little left to flush; it also keeps
    a large save from filling the page cache. Measured on a 2-core VM disk: 1.35-1.6 GiB/s vs
    1.26 GiB/s for plain buffered writes + fsync.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._chunk = knobs.writeback_chunk_bytes()
        self._written = 0
        self._flushed = 0

    def write(self, data: memoryview) -> int:
        n = os.write(self._fd, data)
        self._written += n
        if self._chunk and self._written - self._flushed >= self._chunk and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, self._flushed, self._written - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._written
        return n

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _error_code(exc: BaseException) -> str | None:
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _short_read(name: str, start: int, length: int, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"data object {name} is truncated: needed bytes [{start}, {start + length}) but only "
        f"{got} of {length} could be read"
    )
