"""Committing a save at a URL: at most one of concurrent saves commits, nothing it does not own
is removed, and what is committed always loads.

A save owns exactly one folder, ``data-<save_id>/`` (``<save_id>`` is :data:`SAVE_ID`), created
with a *marker* object, :data:`MARKER`, before any data: it names the save and the commit it
found at the URL when it started, its *base* (the committed metadata's identity, its *token*,
and the save id that committed it; ``null`` if the URL held none). Four steps, all here:

1. :func:`begin` (the coordinator, before any rank writes): finds the base, refuses at once if
   there is one and ``overwrite`` is off, removes data of saves that can no longer commit
   (:func:`remove_stale`), and creates the folder with its marker.
2. The ranks write their data objects into the folder. A rank that fails removes the whole
   folder (:func:`discard`): the save cannot commit any more, and a retry finds the space free.
3. :func:`publish` (the coordinator, once every rank succeeded): fails with
   :class:`~torch_ucp.errors.CommitConflictError` if its marker or a data object is gone, then
   writes the metadata object *conditionally*: it is created only if the URL still holds the
   base (nothing, with ``overwrite=False``; the same commit as at the start otherwise). If
   another save committed in between, it fails with ``CommitConflictError`` (or
   ``CheckpointExistsError``) and the writer removes its own folder.
4. :func:`remove_stale` (after the commit): removes the folders of saves that can never commit.

Why cleanup never removes live data: commits form a chain (each commit's base is the commit it
replaced, because the write is conditional on it). Seen from a commit ``K``, a folder is removed
only if it is torch_ucp's (:data:`SAVE_ID` name, and a marker, or only data objects named as
torch_ucp names them) and its save can never commit: its base is an *ancestor* of ``K`` (found by
following the bases recorded in the markers, so strictly older than ``K``) or ``null`` while a
commit exists, or it is itself an ancestor (replaced data). A save that may still commit has
``K`` or a later commit as its base, so no cleanup - even one acting on an outdated ``K`` -
removes it, and the committed checkpoint's folder is never removed. Other entries at the URL
(a user's ``data-raw/``, stock DCP files) are never touched.

Per backend:

- **Local disk and NFS**: the folder is created under a temporary name with its marker inside
  and renamed into place, so no ``data-<save_id>/`` exists without one. The metadata is written
  to ``data-<save_id>/.metadata.pending`` and fsynced, its token (device, inode, size, mtime)
  recorded in the marker, then, holding an exclusive ``fcntl`` lock on :data:`LOCK_FILE` (plus a
  per-process lock for threads; the file exists only while a commit holds it): the current
  token is compared with the base, and the metadata
  is published with ``link()`` (create-if-absent, atomic on NFS too) when the base is "nothing",
  or with ``rename()`` over the old one otherwise; then the directories are fsynced. Two
  committers on one host or on NFS clients with working locks (NLM for NFSv3, built in for v4)
  exclude each other. On a mount without locks (``nolock``: ``ENOLCK``) a first commit is still
  exclusive (``link()``), while replacing a commit falls back to check-then-rename (a warning
  says so).
- **S3**: the marker and data objects are uploaded, then the metadata is one ``PutObject`` with
  ``If-None-Match: *`` (base "nothing") or ``If-Match: <base ETag>``, carrying the save id as
  user metadata (``x-amz-meta-torch-ucp-save-id``); S3 evaluates the condition atomically
  (AWS S3 since 2024, and the moto server the tests run). A 412 whose current metadata carries
  this save's id is a retried request that had succeeded.
- **Other fsspec stores** (``gs://``, ``memory://`` ...): best effort: the base is compared,
  then the metadata written; two commits in the same instant can both succeed there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError, CheckpointExistsError, CommitConflictError
from torch_ucp.metadata.schema import DATA_PREFIX, METADATA_FILE
from torch_ucp.storage.retry import error_code
from torch_ucp.storage.store import Store

logger = logging.getLogger(__name__)

SAVE_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")
MARKER = ".torch_ucp_save"
PENDING = ".metadata.pending"
LOCK_FILE = ".torch_ucp.lock"
INCOMING = ".incoming"  # suffix of a local folder being created with its marker
EXISTS = "Checkpoint already exists"
"""How every overwrite refusal starts: stock DCP's words (``FileSystemWriter``), then ours."""
S3_SAVE_ID_KEY = "torch-ucp-save-id"  # user metadata of the committed metadata object
# what a folder of data written before markers existed may hold, to be recognised as ours
_OWN_OBJECT = re.compile(r"\d{5}-\d+\.bin|\d{5}\.idx|" + re.escape(MARKER) + "|" + re.escape(PENDING))
_SAVE_ID_IN_METADATA = re.compile(rb'"save_id"\s*:\s*"(\d{8}T\d{6}-[0-9a-f]{8})"')


def new_save_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def data_folder(save_id: str) -> str:
    return f"{DATA_PREFIX}{save_id}"


def save_id_of(name: str) -> str | None:
    """The save id of a torch_ucp data folder name, else ``None``."""
    if name.startswith(DATA_PREFIX) and SAVE_ID.fullmatch(name[len(DATA_PREFIX) :]):
        return name[len(DATA_PREFIX) :]
    return None


@dataclass(frozen=True)
class Committed:
    """A commit found at the URL: ``token`` identifies the metadata object (S3 ETag; local
    device:inode:size:mtime), ``save_id`` the save that wrote it (``None`` if unknown)."""

    token: str
    save_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "save_id": self.save_id}

    @staticmethod
    def from_json(d: Any) -> Committed | None:
        if d is None:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("token"), str):
            raise ValueError("bad base")
        sid = d.get("save_id")
        return Committed(d["token"], sid if isinstance(sid, str) else None)


# -- what is at the URL -----------------------------------------------------------------------
def _is_s3(store: Store) -> bool:
    return "s3" in (store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,))


def _local_token(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _s3_call(store: Store, method: str, rel: str, **kwargs: Any) -> Any:
    bucket, key, _ = store.fs.split_path(store.path(rel))
    return store.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)


def current(store: Store) -> Committed | None:
    """The commit at the URL now, or ``None`` if it holds no metadata object."""
    if store.posix:
        try:
            st = os.stat(store.path(METADATA_FILE), follow_symlinks=False)
        except FileNotFoundError:
            return None
        token = _local_token(st)
        return Committed(token, _local_committer(store, token))
    if _is_s3(store):
        def head() -> Any:
            try:
                return _s3_call(store, "head_object", METADATA_FILE)
            except FileNotFoundError:
                return None

        info = store.retrying(head, f"checking {store.describe(METADATA_FILE)}")
        if info is None:
            return None
        sid = (info.get("Metadata") or {}).get(S3_SAVE_ID_KEY)
        return Committed(str(info["ETag"]), sid if sid and SAVE_ID.fullmatch(sid) else _parsed_committer(store))
    if not store.exists(METADATA_FILE):
        return None
    info = store.fs.info(store.path(METADATA_FILE))
    token = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("created") or info.get("size"))
    return Committed(token, _parsed_committer(store))


def _local_committer(store: Store, token: str) -> str | None:
    """The save whose marker recorded the committed metadata's token, else the save id the
    metadata names (metadata written before markers existed)."""
    for name in store.list_dir(""):
        sid = save_id_of(name)
        if sid is not None:
            marker = read_marker(store, sid)
            if isinstance(marker, dict) and marker.get("metadata") == token:
                return sid
    return _parsed_committer(store)


def _parsed_committer(store: Store) -> str | None:
    """The ``save_id`` near the start of a JSON metadata object (bounded read), else ``None``."""
    try:
        head = store.fs.cat_file(store.path(METADATA_FILE), start=0, end=4096)
    except Exception:  # noqa: BLE001 - unknown is a fine answer
        return None
    m = _SAVE_ID_IN_METADATA.search(head)
    return m.group(1).decode() if m else None


_MISSING = object()


def read_marker(store: Store, save_id: str, folder: str | None = None) -> Any:
    """The marker of a save as a dict, :data:`_MISSING` if absent, ``None`` if unreadable."""
    rel = f"{folder or data_folder(save_id)}/{MARKER}"
    try:
        data = store.read_bytes(rel, max_bytes=1 << 16)
    except FileNotFoundError:
        return _MISSING
    except (OSError, CheckpointError):
        return None
    try:
        marker = json.loads(data)
    except ValueError:
        return None
    if not isinstance(marker, dict) or marker.get("torch_ucp_save") != save_id:
        return None
    return marker


def _marker_bytes(save_id: str, base: Committed | None, metadata_token: str | None = None) -> bytes:
    marker = {
        "torch_ucp_save": save_id,
        "base": base.to_json() if base is not None else None,
        "metadata": metadata_token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": time.time(),
    }
    return json.dumps(marker, separators=(",", ":")).encode()


# -- 1. begin ---------------------------------------------------------------------------------
def begin(store: Store, save_id: str, *, overwrite: bool) -> Committed | None:
    """Start a save: find the base, check ``overwrite``, clean up, create the marked folder."""
    base = current(store)
    if base is not None and not overwrite:
        raise CheckpointExistsError(
            f"{EXISTS}: {store.url} already holds a committed checkpoint and overwrite is off; "
            "pass UCPWriter(..., overwrite=True) to replace it"
        )
    if base is None or base.save_id is not None:
        remove_stale(store, base.save_id if base is not None else None)
    try:
        _create_marked_folder(store, save_id, _marker_bytes(save_id, base))
    except FileNotFoundError as e:
        # A save that committed meanwhile may remove this folder while it is being created
        # (its base is outdated, so it can never commit): the same conflict publish() reports.
        found = current(store)
        if found is not None and (base is None or found.token != base.token):
            discard(store, save_id)
            raise _conflict(store, save_id, found, overwrite) from e
        raise
    return base


def _create_marked_folder(store: Store, save_id: str, marker: bytes) -> None:
    folder = data_folder(save_id)
    if store.posix:  # the folder appears with its marker inside, never without
        incoming = store.path(folder + INCOMING)
        os.makedirs(incoming)
        store.write_atomic(f"{folder}{INCOMING}/{MARKER}", marker)
        os.rename(incoming, store.path(folder))
        store.fsync_dir("")
    else:
        store.write_atomic(f"{folder}/{MARKER}", marker)


# -- 3. publish -------------------------------------------------------------------------------
def publish(
    store: Store,
    save_id: str,
    metadata: bytes,
    *,
    overwrite: bool,
    objects: Mapping[str, int] | None = None,
) -> None:
    """Commit ``metadata`` for ``save_id`` if the URL still holds the save's base.

    ``objects``: data objects (relative names) and the size each must have at least, checked
    first. Raises :class:`~torch_ucp.errors.CommitConflictError` when the save's data was
    removed or another save committed since it began, and
    :class:`~torch_ucp.errors.CheckpointExistsError` when ``overwrite`` is off and a checkpoint
    was committed meanwhile. Nothing is committed then.
    """
    marker = read_marker(store, save_id)
    if not isinstance(marker, dict):
        raise CommitConflictError(
            f"cannot commit save {save_id} at {store.url}: its data folder "
            f"{store.describe(data_folder(save_id))} was removed (by a concurrent save that "
            "committed there, or by hand); nothing was committed"
        )
    base = Committed.from_json(marker.get("base"))
    _check_objects(store, save_id, objects or {})
    if store.posix:
        _publish_local(store, save_id, metadata, base, overwrite, marker)
    elif _is_s3(store):
        _publish_s3(store, save_id, metadata, base, overwrite)
    else:
        found = current(store)
        if found is not None and (not overwrite or base is None or found.token != base.token):
            raise _conflict(store, save_id, found, overwrite)
        store.write_atomic(METADATA_FILE, metadata)


def _conflict(store: Store, save_id: str, found: Committed, overwrite: bool) -> CheckpointError:
    other = f" (save {found.save_id})" if found.save_id else ""
    if not overwrite:
        return CheckpointExistsError(
            f"{EXISTS}: cannot commit save {save_id} at {store.url}: a checkpoint{other} was committed "
            "there while this save ran, and overwrite is off; nothing of this save was committed"
        )
    return CommitConflictError(
        f"cannot commit save {save_id} at {store.url}: another save{other} committed there after "
        "this save started; nothing of this save was committed (save again to replace it)"
    )


def _check_objects(store: Store, save_id: str, objects: Mapping[str, int]) -> None:
    if not objects:
        return
    folder = data_folder(save_id)
    try:
        store.fs.invalidate_cache(store.path(folder))
        listing = store.fs.ls(store.path(folder), detail=True)
    except FileNotFoundError:
        listing = []
    sizes = {os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in listing}
    for rel, needed in objects.items():
        name = rel.split("/")[-1] if rel.startswith(folder + "/") else None
        if name is None or sizes.get(name, -1) < needed:
            raise CommitConflictError(
                f"cannot commit save {save_id} at {store.url}: data object {store.describe(rel)} "
                f"is missing or shorter than {needed} bytes (removed by a concurrent save or by "
                "hand); nothing was committed"
            )


_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _commit_lock(store: Store) -> Iterator[None]:
    """Exclusive commit lock of a local/NFS checkpoint folder: a per-process lock (threads) and
    an ``fcntl`` lock on :data:`LOCK_FILE` (processes, hosts; the kernel releases it if the
    holder dies). The holder removes the file before releasing it, so none is left behind; a
    locker that finds its file no longer at the path (removed meanwhile) starts over."""
    import fcntl

    path = os.path.join(store.root, LOCK_FILE)
    with _PROCESS_LOCKS_GUARD:
        local = _PROCESS_LOCKS.setdefault(os.path.realpath(path), threading.Lock())
    timeout = knobs.commit_lock_timeout()
    deadline = time.monotonic() + timeout
    with local:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                locked = _try_lock(fcntl, fd, path)
                if locked and _same_file(fd, path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if time.monotonic() > deadline:
                raise CommitConflictError(
                    f"cannot commit at {store.url}: the commit lock {path} has been held for more "
                    f"than {timeout:.0f}s by another process"
                )
            time.sleep(0.005)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)  # releases the fcntl lock


def _try_lock(fcntl: Any, fd: int, path: str) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno == errno.ENOLCK:
            logger.warning(
                "torch_ucp: %s does not support locks: replacing a committed checkpoint there is "
                "check-then-act against concurrent saves", path
            )
            return True
        if e.errno in (errno.EACCES, errno.EAGAIN, errno.ESTALE):
            return False
        raise


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed by its last holder)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _publish_local(
    store: Store, save_id: str, metadata: bytes, base: Committed | None, overwrite: bool,
    marker: dict[str, Any],
) -> None:
    folder = data_folder(save_id)
    pending_rel = f"{folder}/{PENDING}"
    pending = store.path(pending_rel)
    with open(pending, "wb") as f:
        f.write(metadata)
        f.flush()
        os.fsync(f.fileno())
    token = _local_token(os.stat(pending))
    # recorded before the commit, so the committed metadata always names its save
    store.write_atomic(f"{folder}/{MARKER}", _marker_bytes(save_id, base, token))
    final = store.path(METADATA_FILE)
    with _commit_lock(store):
        found = current(store)
        if base is None or not overwrite:
            if found is not None:
                raise _conflict(store, save_id, found, overwrite)
            try:
                os.link(pending, final)  # create-if-absent, atomic on local disks and NFS
            except FileExistsError:
                if os.stat(pending).st_nlink < 2:  # not a retransmitted success (NFS)
                    raise _conflict(store, save_id, current(store) or Committed("?", None), overwrite) from None
            os.unlink(pending)
        else:
            if found is None or found.token != base.token:
                raise _conflict(store, save_id, found or Committed("?", None), overwrite)
            os.replace(pending, final)
        store.fsync_dir("")
        store.fsync_dir(folder)


def _publish_s3(
    store: Store, save_id: str, metadata: bytes, base: Committed | None, overwrite: bool
) -> None:
    condition = {"IfNoneMatch": "*"} if base is None or not overwrite else {"IfMatch": base.token}

    def put() -> None:
        try:
            _s3_call(store, "put_object", METADATA_FILE, Body=metadata,
                     Metadata={S3_SAVE_ID_KEY: save_id}, **condition)
        except OSError as e:
            if error_code(e) not in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise
            found = current(store)
            if found is not None and found.save_id == save_id:
                return  # an earlier attempt of this request succeeded
            raise _conflict(store, save_id, found or Committed("?", None), overwrite) from None
        finally:
            store.fs.invalidate_cache(store.path(METADATA_FILE))

    store.retrying(put, f"committing {store.describe(METADATA_FILE)}")


# -- failure and cleanup ----------------------------------------------------------------------
def discard(store: Store, save_id: str) -> None:
    """Remove a failed save's own folder (best effort: a failure is logged, not raised)."""
    folder = data_folder(save_id)
    try:
        store.remove(folder)
        if store.posix:
            store.remove(folder + INCOMING)
        logger.info("torch_ucp: removed the data of failed save %s", store.describe(folder))
    except Exception as e:  # noqa: BLE001 - the save's own error matters more
        logger.warning("torch_ucp: could not remove %s after a failed save: %s", store.describe(folder), e)


def remove_stale(store: Store, keep_save_id: str | None) -> list[str]:
    """Remove data of saves that can never commit, seen from the commit of ``keep_save_id``
    (``None``: the URL holds no commit). Returns the removed folder names; best effort."""
    try:
        names = store.list_dir("")
    except Exception as e:  # noqa: BLE001 - cleanup must not fail a committed save
        logger.warning("torch_ucp: could not list %s for cleanup: %s", store.url, e)
        return []
    markers: dict[str, Any] = {}
    incoming: dict[str, Any] = {}  # local folders still being created: judged by their marker
    for name in names:
        if name.endswith(INCOMING):
            sid = save_id_of(name[: -len(INCOMING)])
            if sid is not None:
                incoming[sid] = read_marker(store, sid, name)
        elif (sid := save_id_of(name)) is not None:
            markers[sid] = read_marker(store, sid)
    ancestors: set[str] = set()
    at = keep_save_id
    while at is not None and isinstance(markers.get(at), dict):
        try:
            base = Committed.from_json(markers[at].get("base"))
        except ValueError:
            break
        if base is None or base.save_id is None or base.save_id in ancestors or base.save_id == keep_save_id:
            break
        ancestors.add(base.save_id)
        at = base.save_id
    removed = []
    for folders, judged in ((markers, data_folder), (incoming, lambda sid: data_folder(sid) + INCOMING)):
        for sid, marker in folders.items():
            name = judged(sid)
            if sid == keep_save_id or marker is _MISSING and folders is incoming:
                continue
            if not _dead(store, sid, marker, keep_save_id, ancestors):
                continue
            try:
                store.remove(name)
                removed.append(name)
                logger.info("torch_ucp: removed stale %s", store.describe(name))
            except Exception as e:  # noqa: BLE001
                logger.warning("torch_ucp: could not remove stale %s: %s", store.describe(name), e)
    return removed


def _dead(store: Store, sid: str, marker: Any, keep: str | None, ancestors: set[str]) -> bool:
    """Whether save ``sid`` (with ``marker``) can never commit, seen from commit ``keep``."""
    if sid in ancestors:
        return True  # a replaced commit
    if marker is None:
        return False  # a marker we cannot read: not ours to judge
    if marker is _MISSING:
        # no marker: written before markers existed (or its marker removed as dead already);
        # ours only if it holds nothing but torch_ucp's own objects
        try:
            entries = store.list_dir(data_folder(sid))
        except Exception:  # noqa: BLE001
            return False
        return all(_OWN_OBJECT.fullmatch(e) for e in entries)
    try:
        base = Committed.from_json(marker.get("base"))
    except ValueError:
        return False
    if base is None:
        return keep is not None  # it needs an empty URL, and a commit exists
    return base.save_id is not None and base.save_id in ancestors
