"""Local disk and NFS: positional reads, unbuffered writes, fsync, objects opened inside the
checkpoint folder only.

Reads use ``os.preadv`` straight into destination memory; writes are unbuffered writes of tensor
memory that start writeback as they go (:class:`_LocalWriter`), and files and folders are
fsynced where durability matters. Local disk errors are not transient (a full disk stays full),
so nothing is retried.

Reads stay inside the checkpoint folder: every object is opened component by component below the
root with ``O_NOFOLLOW``, so a data or metadata object that is a symbolic link (or sits under
one) is refused unless the store is told to follow links, and anything but a regular file (a
FIFO, a device) is refused without blocking on it. The root itself may be a link: the caller
named it. Sizes are checked before memory is allocated for a read.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import uuid
from collections.abc import Sequence
from typing import IO, ClassVar

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError, UnsafeCheckpointError
from torch_ucp.storage.store import Store, short_read


class LocalStore(Store):
    """A checkpoint folder on local disk or NFS."""

    posix: ClassVar[bool] = True

    def read_bytes(self, rel: str, max_bytes: int | None = None, *, limit_knob: str = "") -> bytes:
        fd = self.open_local(rel)
        try:
            size = os.fstat(fd).st_size
            self._check_limit(rel, size, max_bytes, limit_knob)
            buf = bytearray(size)
            self._pread_exact(fd, rel, 0, memoryview(buf))
            return bytes(buf)
        finally:
            os.close(fd)

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        if length == 0:
            return b""
        fd = self._open_data(rel)
        try:
            self._check_size(fd, rel, start, length)
            buf = bytearray(length)
            self._pread_exact(fd, rel, start, memoryview(buf))
            return bytes(buf)
        finally:
            os.close(fd)

    def read_into(self, rel: str, ranges: Sequence[tuple[int, int]], outs: Sequence[memoryview]) -> None:
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
                raise short_read(self.describe(rel), start, length, done)
            done += n

    def _check_size(self, fd: int, rel: str, start: int, length: int) -> None:
        size = os.fstat(fd).st_size
        if start + length > size:
            raise short_read(self.describe(rel), start, length, max(0, size - start))

    def open_read(self, rel: str) -> IO[bytes]:
        return os.fdopen(self.open_local(rel), "rb")

    def local_file(self, rel: str) -> str | None:
        """The path of ``rel``, once it is known to be a regular file inside the folder."""
        os.close(self.open_local(rel))
        return self.path(rel)

    # -- objects opened inside the checkpoint folder only ------------------------------------
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
        os.makedirs(self.path(rel), exist_ok=True)

    def open_write(self, rel: str) -> IO[bytes]:
        os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
        return _LocalWriter(self.path(rel))  # type: ignore[return-value]

    def close_durably(self, f: IO[bytes]) -> None:
        """Flush and fsync the file, then close it."""
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def fsync_dir(self, rel: str) -> None:
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write a unique temporary, fsync it, rename it over ``rel`` (atomic on local disk and
        NFS), fsync the folder."""
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
