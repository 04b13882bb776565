"""The asynchronous saves of this process that the program has not seen the end of.

A background save must never be lost silently. Two things end a process under a save's feet:

* **Interpreter exit.** At exit, ``threading._shutdown`` first runs the functions registered
  with ``threading._register_atexit`` (last registered first), then joins the non-daemon
  threads, and only then do ``atexit`` handlers run. ``concurrent.futures`` registers one of
  those early functions: from then on every ``ThreadPoolExecutor.submit`` raises ``cannot
  schedule new futures after interpreter shutdown``, so a save still planning or writing
  (writer threads, DCP's own pools) fails, and an ``atexit`` handler would come too late.
  :func:`track` therefore registers :func:`_wait_at_exit` the same way, after
  ``concurrent.futures`` did, so it runs first: it logs ``waiting for the checkpoint save to
  <url> to finish``, waits, and if a save failed and the program never saw the error it prints
  the error and ends the process with exit status 1 (after running the ``atexit`` handlers).
* **``dist.destroy_process_group()``.** Destroying the default group destroys the gloo
  checkpoint group the background save runs its collectives on. The first :func:`track` wraps
  ``torch.distributed.destroy_process_group`` so that destroying the default group (or a
  checkpoint group) first waits for the saves in flight, with the same log line. A caller that
  bound the original function before the first save (``from torch.distributed import
  destroy_process_group`` at import time) bypasses the wrapper; the save then fails with one
  error naming that cause (:func:`group_destroyed_error`) and the exit status is 1.

"Seen" means that the program asked for the outcome: :meth:`AsyncSaveHandle.result`,
``result()`` or ``exception()`` of ``handle.done()``, or :func:`wait`. Committed saves are
forgotten as soon as they commit; failed ones are kept until seen.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from torch_ucp.errors import CheckpointError

if TYPE_CHECKING:
    from torch_ucp.asynchronous.saver import AsyncSaveHandle

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_UNSEEN: list[AsyncSaveHandle] = []  # running, or failed and not seen; in start order
_LATEST: AsyncSaveHandle | None = None  # the last save started (one in flight per process)
_CHECKPOINT_GROUPS: list[Any] = []  # the gloo groups background saves ran on
_INSTALLED = False


class ObservedFuture(Future):
    """A :class:`~concurrent.futures.Future` that remembers whether its outcome was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def result(self, timeout: float | None = None) -> Any:
        self.seen = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.seen = True
        return super().exception(timeout)


def track(handle: AsyncSaveHandle, group: Any = None) -> None:
    """Record a save that just started (on checkpoint ``group``); install the exit and
    ``destroy_process_group`` hooks on first use."""
    global _LATEST
    _install()
    with _LOCK:
        _UNSEEN.append(handle)
        _LATEST = handle
        if group is not None and not any(g is group for g in _CHECKPOINT_GROUPS):
            _CHECKPOINT_GROUPS.append(group)
    handle.done().add_done_callback(lambda _: _forget_if_committed(handle))


def latest() -> AsyncSaveHandle | None:
    """The last save started in this process (possibly finished)."""
    return _LATEST


def running() -> list[AsyncSaveHandle]:
    """Saves of this process that have not finished yet."""
    with _LOCK:
        return [h for h in _UNSEEN if not h.done().done()]


def wait(timeout: float | None = None) -> None:
    """Wait for every asynchronous save of this process whose outcome the program has not seen
    (running, or failed), then raise the first failure (DCP's ``CheckpointException`` or a
    :class:`torch_ucp.CheckpointError`); later failures are logged. Returns at once when
    nothing is in flight.

    Raises:
        TimeoutError: a save is still running after ``timeout`` seconds.
    """
    with _LOCK:
        handles = list(_UNSEEN)
    _, not_done = wait_futures([h.done() for h in handles], timeout=timeout)
    if not_done:
        late = [h.checkpoint_id for h in handles if h.done() in not_done]
        raise TimeoutError(f"torch_ucp: checkpoint saves still running after {timeout}s: {late}")
    failures = [(h, h.done().exception()) for h in handles]  # marks them seen
    failures = [(h, e) for h, e in failures if e is not None]
    with _LOCK:
        for h in handles:
            if h in _UNSEEN:
                _UNSEEN.remove(h)
    for h, e in failures[1:]:
        logger.error("torch_ucp: the checkpoint save to %s failed too: %s", h.checkpoint_id, e)
    if failures:
        raise failures[0][1]


def group_destroyed_error(checkpoint_id: str | None, group: Any) -> CheckpointError | None:
    """If the save's checkpoint ``group`` no longer exists, the error that names that cause
    (raise it from the collective's error, which only says the group is not registered)."""
    if group is None or _group_alive(group):
        return None
    return CheckpointError(
        f"the checkpoint save to {checkpoint_id} was abandoned: its process group was destroyed "
        "(torch.distributed.destroy_process_group()) while it was in flight; call "
        "torch_ucp.wait() before destroy_process_group()"
    )


# ---------------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------------


def _forget_if_committed(handle: AsyncSaveHandle) -> None:
    if Future.exception(handle.done()) is None:  # (the base method: does not mark it seen)
        with _LOCK:
            if handle in _UNSEEN:
                _UNSEEN.remove(handle)


def _group_alive(group: Any) -> bool:
    if not dist.is_initialized():
        return False
    try:
        dist.get_process_group_ranks(group)
    except (ValueError, KeyError, RuntimeError):
        return False
    return True


def _wait_for_running(why: str) -> None:
    for handle in running():
        logger.warning(
            "torch_ucp: waiting for the checkpoint save to %s to finish (%s)",
            handle.checkpoint_id, why,
        )
        wait_futures([handle.done()])


def _unseen_failures() -> list[tuple[AsyncSaveHandle, BaseException]]:
    with _LOCK:
        handles = list(_UNSEEN)
    out = []
    for h in handles:
        fut = h.done()
        if fut.done() and not getattr(fut, "seen", False):
            error = Future.exception(fut)  # without marking it seen
            if error is not None:
                out.append((h, error))
    return out


def _wait_at_exit() -> None:
    """Registered with ``threading._register_atexit``: runs before ``concurrent.futures`` stops
    accepting work, while the background saves can still finish."""
    try:
        _wait_for_running("the interpreter is exiting; call torch_ucp.wait() to wait explicitly")
    except BaseException as e:  # noqa: BLE001 - e.g. Ctrl-C while waiting: report, do not hide
        print(f"torch_ucp: stopped waiting for checkpoint saves at exit: {e!r}", file=sys.stderr)
    failures = _unseen_failures()
    if not failures:
        return
    for handle, error in failures:  # (DCP's CheckpointException carries each rank's traceback)
        print(
            f"torch_ucp: the checkpoint save to {handle.checkpoint_id} failed; exiting with "
            f"status 1: {type(error).__name__}: {error}",
            file=sys.stderr,
            flush=True,
        )
    _exit_with_failure()


def _exit_with_failure() -> None:
    """Exit status 1 from inside interpreter shutdown: nothing else can change it there. The
    ``atexit`` handlers still run first (logging flushes, user handlers)."""
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is not None:
        try:
            run_exitfuncs()
        except BaseException:  # noqa: BLE001 - their errors are printed by atexit itself
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(1)


def _waiting_destroy_process_group(original: Any) -> Any:
    @functools.wraps(original)
    def destroy_process_group(group: Any = None) -> Any:
        world = getattr(dist.GroupMember, "WORLD", None)
        if group is None or group is world or any(g is group for g in _CHECKPOINT_GROUPS):
            _wait_for_running("torch.distributed.destroy_process_group() was called")
        return original(group)

    destroy_process_group._torch_ucp_waits_for_saves = True  # type: ignore[attr-defined]
    return destroy_process_group


def _install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    with _LOCK:
        if _INSTALLED:
            return
        import concurrent.futures.thread  # noqa: F401 - its exit hook first, so ours runs before

        register = getattr(threading, "_register_atexit", None)
        try:
            if register is not None:
                register(_wait_at_exit)
            else:  # pragma: no cover - other Python implementations
                atexit.register(_wait_at_exit)
        except RuntimeError:  # already shutting down: nothing left to register for
            pass
        c10d = dist.distributed_c10d
        if not getattr(c10d.destroy_process_group, "_torch_ucp_waits_for_saves", False):
            wrapped = _waiting_destroy_process_group(c10d.destroy_process_group)
            c10d.destroy_process_group = wrapped
            dist.destroy_process_group = wrapped
        _INSTALLED = True
