"""The storage interface: a checkpoint root on some filesystem, and the factory that picks an
implementation by URL.

:class:`Store` is what the writer, the reader, the commit protocol, the builder, ``verify`` and
the interop readers use; none of them branches on the backend. There is one implementation per
kind of storage, chosen by :func:`open_store` from the URL, as DCP's ``FileSystemBase`` does:

- :class:`~torch_ucp.storage.local_store.LocalStore` for local paths and NFS (``/path``,
  ``file://``): positional reads into destination memory, unbuffered writes, fsync of files and
  folders, objects opened inside the checkpoint folder only (no symlinks, regular files only);
- :class:`~torch_ucp.storage.fsspec_store.FsspecStore` for every other fsspec URL (``s3://``,
  ``gs://``, ``memory://`` ...): ranged reads in parallel, multipart uploads, single-PUT
  publication, bounded retries of transient errors (:mod:`torch_ucp.storage.retry`).

What differs between backends beyond that is declared, not tested by type: :attr:`Store.posix`
(atomic rename, ``link()``, ``fcntl`` locks and memory maps: the commit protocol and the read
engine use it) and :attr:`Store.default_write_threads`.

A store is picklable: it keeps only the URL and options and re-opens the filesystem lazily, so
writers and readers can be shipped to DCP's async-save process.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, ClassVar, TypeVar

import fsspec

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.storage.urls import is_local_url

T = TypeVar("T")


class Store:
    """Reads and writes objects relative to a checkpoint root URL (see the module docstring).

    Args:
        url: the checkpoint folder: a path or fsspec URL.
        storage_options: passed to fsspec (``endpoint_url=``, ``key=`` ...).
        follow_symlinks: local/NFS: read objects that are symbolic links (default: refused).
    """

    posix: ClassVar[bool] = False
    """A POSIX filesystem: atomic ``rename``/``link``, ``fcntl`` locks, memory-mappable files."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

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
    def default_write_threads(self) -> int:
        """Writer threads (= data objects, = uploads in flight) per rank by default."""
        return knobs.write_threads()

    def retrying(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """Run ``fn``, retrying transient errors where the backend has them."""
        return fn()

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def describe(self, rel: str) -> str:
        """A user-facing name of an object: the checkpoint URL joined with ``rel``."""
        return posixpath.join(self.url.rstrip("/"), rel)

    def child(self, rel: str) -> Store:
        """A store of the same kind and options rooted at ``rel`` below this one."""
        return type(self)(self.describe(rel), self.storage_options, follow_symlinks=self.follow_symlinks)

    # -- reads --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        def exists() -> bool:
            self.fs.invalidate_cache(self.path(rel))  # other ranks/processes may have written it
            return self.fs.exists(self.path(rel))

        return self.retrying(exists, f"checking {self.describe(rel)}")

    def size(self, rel: str) -> int:
        """Bytes of object ``rel`` (``FileNotFoundError`` if it does not exist)."""
        return int(self.retrying(lambda: self.fs.size(self.path(rel)), f"checking {self.describe(rel)}"))

    def is_dir(self, rel: str) -> bool:
        return bool(self.retrying(lambda: self.fs.isdir(self.path(rel)), f"checking {self.describe(rel)}"))

    def is_file(self, rel: str) -> bool:
        return bool(self.retrying(lambda: self.fs.isfile(self.path(rel)), f"checking {self.describe(rel)}"))

    def find(self, rel: str = "") -> list[str]:
        """Every object below folder ``rel``, as names relative to the root."""
        base = self.root.rstrip("/") + "/"
        found = self.retrying(lambda: self.fs.find(self.path(rel)), f"listing {self.describe(rel)}")
        return [p[len(base) :] if p.startswith(base) else p for p in found]

    def glob(self, pattern: str) -> list[str]:
        """Objects matching ``pattern`` (relative to the root), as relative names."""
        base = self.root.rstrip("/") + "/"
        found = self.retrying(lambda: self.fs.glob(self.path(pattern)), f"listing {self.describe(pattern)}")
        return sorted(p[len(base) :] if p.startswith(base) else p for p in found)

    def open_read(self, rel: str) -> IO[bytes]:
        """A seekable binary stream of object ``rel`` (``FileNotFoundError`` if missing)."""
        return self.retrying(lambda: self.fs.open(self.path(rel), "rb"), f"opening {self.describe(rel)}")

    def local_file(self, rel: str) -> str | None:
        """A path to object ``rel`` that can be memory-mapped, where the backend has one."""
        return None

    def read_bytes(self, rel: str, max_bytes: int | None = None, *, limit_knob: str = "") -> bytes:
        """The whole object ``rel``; with ``max_bytes``, refused if larger, with bounded memory.
        ``limit_knob`` names the setting in the error. Raises ``FileNotFoundError`` if it does
        not exist."""
        raise NotImplementedError

    def read_many(self, rels: Sequence[str], max_bytes: Sequence[int]) -> list[bytes]:
        """Whole objects, read in parallel (metadata objects: small, many), each refused past
        its ``max_bytes``."""
        if len(rels) <= 1:
            return [self.read_bytes(r, n) for r, n in zip(rels, max_bytes)]
        with ThreadPoolExecutor(min(len(rels), knobs.read_threads()), "ucp-meta") as pool:
            return list(pool.map(self.read_bytes, rels, max_bytes))

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``rel``. The object's size is checked before any
        memory is allocated for them (a length recorded in metadata is not trusted)."""
        raise NotImplementedError

    def read_into(self, rel: str, ranges: Sequence[tuple[int, int]], outs: Sequence[memoryview]) -> None:
        """Read each ``(start, length)`` range of ``rel`` into the matching writable buffer."""
        raise NotImplementedError

    def _check_limit(self, rel: str, size: int, max_bytes: int | None, knob: str = "", *, exact: bool = True) -> None:
        if max_bytes is not None and size > max_bytes:
            what = f"{size} bytes" if exact else f"over {max_bytes} bytes"
            raise CorruptCheckpointError(
                f"{self.describe(rel)} is {what}, more than the {max_bytes} allowed"
                + (f" ({knob})" if knob else "")
            )

    # -- writes -------------------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        """Create folder ``rel`` where the backend has folders."""

    def open_write(self, rel: str) -> IO[bytes]:
        """A binary stream creating ``rel``; call :meth:`close_durably` when done."""
        raise NotImplementedError

    def abort_write(self, f: IO[bytes]) -> None:
        """Give up a stream from :meth:`open_write` (nothing is published)."""
        try:
            f.close()
        except Exception:  # noqa: BLE001 - best effort, the original error matters
            pass

    def close_durably(self, f: IO[bytes]) -> None:
        """Close a stream from :meth:`open_write` with its bytes on stable storage."""
        f.close()

    def fsync_dir(self, rel: str) -> None:
        """Make directory entries (new files, renames) durable, where that is a separate step."""

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
        """Publish ``rel`` so that readers see either nothing, the old or the new bytes."""
        raise NotImplementedError

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


def open_store(
    url: str | os.PathLike, storage_options: dict[str, Any] | None = None, *, follow_symlinks: bool = False
) -> Store:
    """The :class:`Store` for ``url``: a local path or ``file://`` URL gets a
    :class:`~torch_ucp.storage.local_store.LocalStore`, any other fsspec URL an
    :class:`~torch_ucp.storage.fsspec_store.FsspecStore`."""
    from torch_ucp.storage.fsspec_store import FsspecStore
    from torch_ucp.storage.local_store import LocalStore

    text = os.fspath(url)
    kind = LocalStore if isinstance(text, str) and is_local_url(text) else FsspecStore
    return kind(url, storage_options, follow_symlinks=follow_symlinks)


def write_all(f: Any, data: memoryview) -> None:
    """Write all of ``data`` (raw file objects may write less than asked)."""
    view = data
    while len(view):
        n = f.write(view)
        if n is None or n == len(view):  # buffered streams write everything
            return
        view = view[n:]


def short_read(name: str, start: int, length: int, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"data object {name} is truncated: needed bytes [{start}, {start + length}) but only "
        f"{got} of {length} could be read"
    )
