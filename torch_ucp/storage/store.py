"""A checkpoint root on any fsspec filesystem, with fast paths for local disk and NFS.

Local paths use positional reads (``os.preadv``) straight into destination memory and
unbuffered writes of tensor memory, fsyncing files and directories where durability matters.
Any other fsspec URL (``s3://``, ``gs://``, ``memory://`` ...) goes through fsspec: streamed
writes (multipart uploads on S3) and parallel ranged reads.

A :class:`Store` is picklable: it keeps only the URL and options and re-opens the filesystem
lazily, so writers and readers can be shipped to DCP's async-save process.

Local reads stay inside the checkpoint folder: every object is opened component by component
below the root with ``O_NOFOLLOW``, so a data or metadata object that is a symbolic link (or sits
under one) is refused unless the store is told to follow links, and anything but a regular file
(a FIFO, a device) is refused without blocking on it. The root itself may be a link: the caller
named it. Sizes are checked before memory is allocated for a read.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError, UnsafeCheckpointError
from torch_ucp.storage.retry import retry

T = TypeVar("T")


class Store:
    """Reads and writes objects relative to a checkpoint root URL."""

    def __init__(
        self,
        url: str | os.PathLike,
        storage_options: dict[str, Any] | None = None,
        *,
        follow_symlinks: bool = False,
    ):
        self.url = os.fspath(url)
        if not isinstance(self.url, str) or not self.url:
            raise ValueError(f"a checkpoint URL must be a non-empty path or URL, got {url!r}")
        self.storage_options = dict(storage_options or {})
        self.follow_symlinks = bool(follow_symlinks)
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "storage_options": self.storage_options,
            "follow_symlinks": self.follow_symlinks,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["url"], state["storage_options"], follow_symlinks=state.get("follow_symlinks", False)
        )

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

    def read_bytes(self, rel: str, max_bytes: int | None = None, *, limit_knob: str = "") -> bytes:
        """The whole object ``rel``; with ``max_bytes``, refused if larger, with bounded memory
        (local: checked before reading; object stores: at most ``max_bytes + 1`` bytes are
        fetched). ``limit_knob`` names the setting in the error. Raises ``FileNotFoundError``
        if it does not exist."""
        if self.is_local:
            fd = self.open_local(rel)
            try:
                size = os.fstat(fd).st_size
                self._check_limit(rel, size, max_bytes, limit_knob)
                buf = bytearray(size)
                self._pread_exact(fd, rel, 0, memoryview(buf))
                return bytes(buf)
            finally:
                os.close(fd)
        end = None if max_bytes is None else max_bytes + 1
        data = self.retrying(
            lambda: self.fs.cat_file(self.path(rel), start=0 if end else None, end=end),
            f"reading {self.describe(rel)}",
        )
        self._check_limit(rel, len(data), max_bytes, limit_knob)
        return data

    def read_many(self, rels: Sequence[str], max_bytes: Sequence[int]) -> list[bytes]:
        """Whole objects, read in parallel (metadata objects: small, many), each refused past
        its ``max_bytes``."""
        if len(rels) <= 1:
            return [self.read_bytes(r, n) for r, n in zip(rels, max_bytes)]
        with ThreadPoolExecutor(min(len(rels), knobs.read_threads()), "ucp-meta") as pool:
            return list(pool.map(self.read_bytes, rels, max_bytes))

    def _check_limit(self, rel: str, size: int, max_bytes: int | None, knob: str = "") -> None:
        if max_bytes is not None and size > max_bytes:
            what = f"{size} bytes" if self.is_local else f"over {max_bytes} bytes"
            raise CorruptCheckpointError(
                f"{self.describe(rel)} is {what}, more than the {max_bytes} allowed"
                + (f" ({knob})" if knob else "")
            )

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``rel``. The object's size is checked before any
        memory is allocated for them (a length recorded in metadata is not trusted)."""
        if length == 0:
            return b""
        if self.is_local:
            fd = self._open_data(rel)
            try:
                self._check_size(fd, rel, start, length)
                buf = bytearray(length)
                self._pread_exact(fd, rel, start, memoryview(buf))
                return bytes(buf)
            finally:
                os.close(fd)
        path = self.path(rel)

        def fetch() -> bytes:
            try:
                return self.fs.cat_file(path, start=start, end=start + length)
            except FileNotFoundError as e:
                raise CorruptCheckpointError(f"data object {self.describe(rel)} is missing") from e
            except OSError as e:
                if _error_code(e) == "InvalidRange":
                    raise _short_read(self.describe(rel), start, length, 0) from e
                raise

        # an object store sends what exists: the response, not the recorded length, sizes it
        blob = self.retrying(fetch, f"reading {self.describe(rel)}")
        if len(blob) != length:
            raise _short_read(self.describe(rel), start, length, len(blob))
        return blob

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
        fd = self._open_data(rel)
        try:
            if ranges:
                last = max(ranges, key=lambda r: r[0] + r[1])
                self._check_size(fd, rel, *last)
            for (start, length), out in zip(ranges, outs):
                self._pread_exact(fd, rel, start, out[:length])
        finally:
            os.close(fd)

    def _pread_exact(self, fd: int, rel: str, start: int, out: memoryview) -> None:
        done, length = 0, len(out)
        while done < length:
            n = os.preadv(fd, [out[done:]], start + done)
            if n == 0:
                raise _short_read(self.describe(rel), start, length, done)
            done += n

    def _check_size(self, fd: int, rel: str, start: int, length: int) -> None:
        size = os.fstat(fd).st_size
        if start + length > size:
            raise _short_read(self.describe(rel), start, length, max(0, size - start))

    # -- local objects: opened inside the checkpoint folder only ------------------------------
    def open_local(self, rel: str) -> int:
        """A read-only descriptor of the regular file ``rel`` under the root (local/NFS only).

        Each component below the root is opened with ``O_NOFOLLOW`` (relative to the previous
        one), so a symbolic link anywhere in ``rel`` raises
        :class:`~torch_ucp.errors.UnsafeCheckpointError` unless ``follow_symlinks``; a FIFO,
        device or directory raises :class:`~torch_ucp.errors.CorruptCheckpointError` (opened
        with ``O_NONBLOCK``: a FIFO without a writer cannot block). A missing file raises
        ``FileNotFoundError``.
        """
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts):
            raise UnsafeCheckpointError(f"{rel!r} is not a path inside the checkpoint folder")
        leaf_flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        if self.follow_symlinks:
            fd = os.open(self.path(rel), leaf_flags)
        else:
            no_follow = getattr(os, "O_NOFOLLOW", 0)
            directory = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
            parent = os.open(self.root, directory)
            try:
                for i, part in enumerate(parts):
                    flags = leaf_flags | no_follow if i == len(parts) - 1 else directory | no_follow
                    try:
                        fd = os.open(part, flags, dir_fd=parent)
                    except OSError as e:
                        if e.errno == errno.ELOOP or os.path.islink(os.path.join(self.root, *parts[: i + 1])):
                            raise self._symlink_error(rel, parts[: i + 1]) from None
                        raise
                    if i < len(parts) - 1:
                        os.close(parent)
                        parent = fd
            finally:
                os.close(parent)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpointError(
                    f"{self.describe(rel)} is not a regular file ({_file_kind(st.st_mode)}); a "
                    "checkpoint's objects are regular files"
                )
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_data(self, rel: str) -> int:
        """:meth:`open_local`, with a missing file reported as a missing data object."""
        try:
            return self.open_local(rel)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"data object {self.describe(rel)} is missing") from e

    def _symlink_error(self, rel: str, parts: list[str]) -> UnsafeCheckpointError:
        link = "/".join(parts)
        try:
            target = os.readlink(os.path.join(self.root, *parts))
        except OSError:
            target = "?"
        what = (
            f"{self.describe(rel)} is a symbolic link to {target!r}"
            if link == rel
            else f"{self.describe(rel)} lies under {self.describe(link)}, a symbolic link to {target!r}"
        )
        return UnsafeCheckpointError(
            f"{what}: torch_ucp reads only regular files inside the checkpoint folder. If you "
            "trust this checkpoint's links, pass follow_symlinks=True (UCPReader, open_checkpoint)"
        )

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


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return f"mode {mode:o}"


def _short_read(name: str, start: int, length: int, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"data object {name} is truncated: needed bytes [{start}, {start + length}) but only "
        f"{got} of {length} could be read"
    )
