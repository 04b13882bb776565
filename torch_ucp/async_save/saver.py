"""Asynchronous save: stage on the caller, plan and write in a background thread.

Timeline of one :meth:`AsyncSaver.save` on every rank::

    caller   | wait for the previous save | state_dict() | stage into the pool | return handle
    ckpt thr |                                                   dcp.save(staged) on the gloo
             |                                                   checkpoint group: plan, write,
             |                                                   checksums, commit (rank 0)

* **One save in flight per process.** A new save first waits for the previous one to finish
  (it logs that it waits, and how long), so staged copies never pile up and the staging pool
  can be reused.
* **Dedicated checkpoint process group.** The background ``dcp.save`` runs its collectives on a
  gloo group over the same ranks as ``process_group`` (or WORLD), created once per process with
  ``dist.new_group(backend="gloo")`` and cached: they never interleave with training
  collectives on the default group (NCCL or gloo). Its first creation is a collective over
  those ranks, so every rank calls the first ``async_save`` (as it must anyway).
* **Failures.** A save that fails on any rank fails on all of them (DCP gathers every rank's
  result) and :class:`torch_ucp.UCPWriter` writes ``.metadata`` only after all ranks wrote their
  data, so nothing is committed; ``handle.result()`` re-raises the error.
* **Thread or process.** The background work is a thread: it shares the GIL with training,
  but the heavy parts (file and socket I/O, checksums, copies) release it.

Call ``handle.result()`` (or :func:`close`) before ``dist.destroy_process_group()``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageWriter

from torch_ucp.async_save.staging import StagingPool
from torch_ucp.async_save.streaming import StreamingPlanner
from torch_ucp.planner import UCPSavePlanner
from torch_ucp.storage import UCPWriter

logger = logging.getLogger(__name__)

MAX_STAGING_BYTES_ENV = "TORCH_UCP_MAX_STAGING_BYTES"


def default_max_staging_bytes() -> int | None:
    """The knob ``TORCH_UCP_MAX_STAGING_BYTES`` (unset or 0: no bound)."""
    value = os.environ.get(MAX_STAGING_BYTES_ENV)
    return int(value) if value and int(value) > 0 else None


# ---------------------------------------------------------------------------------------------
# the handle
# ---------------------------------------------------------------------------------------------


@dataclass
class AsyncSaveStats:
    """Where the time of one save went (seconds) and what was staged (bytes), on this rank.

    Attributes:
        waited: waiting for the previous save to finish.
        state_dict: calling ``state_dict()`` on ``Stateful`` entries.
        staging: copying into the staging pool.
        streaming: bounded staging only: waiting for the writer to copy the streamed tensors.
        blocked: the whole ``async_save`` call, as the caller saw it.
        background: the background ``dcp.save`` (plan, write, commit); set when it finishes.
        pooled_bytes: bytes staged in the pool.
        streamed_bytes: bytes the writer copied out of live tensors (bounded staging).
        pool_allocated: whether this save (re-)allocated the pool's arena.
    """

    waited: float = 0.0
    state_dict: float = 0.0
    staging: float = 0.0
    streaming: float = 0.0
    blocked: float = 0.0
    background: float | None = None
    pooled_bytes: int = 0
    streamed_bytes: int = 0
    pool_allocated: bool = False


class AsyncSaveHandle:
    """The running save returned by :func:`async_save`.

    ``staged()`` resolves once the state is copied out of the training tensors (always before
    ``async_save`` returns; kept for symmetry with DCP's ``AsyncSaveResponse``); ``done()``
    resolves to DCP's :class:`Metadata` once the checkpoint is committed, or holds the error.
    """

    def __init__(self, checkpoint_id: str | None) -> None:
        self.checkpoint_id = checkpoint_id
        self.stats = AsyncSaveStats()
        self._staged: Future[None] = Future()
        self._done: Future[Metadata] = Future()

    def staged(self) -> Future[None]:
        """Future resolved when the state has been staged (training may mutate it)."""
        return self._staged

    def done(self) -> Future[Metadata]:
        """Future resolved when the checkpoint is committed (or failed)."""
        return self._done

    def result(self, timeout: float | None = None) -> Metadata:
        """Wait for the save; return DCP's metadata or re-raise the save's error."""
        return self._done.result(timeout)

    def __repr__(self) -> str:
        state = "running"
        if self._done.done():
            state = "failed" if self._done.exception() is not None else "committed"
        return f"AsyncSaveHandle({self.checkpoint_id!r}, {state})"


# ---------------------------------------------------------------------------------------------
# process-wide state: the save in flight, the checkpoint process groups
# ---------------------------------------------------------------------------------------------

_CALL_LOCK = threading.Lock()  # one async_save call at a time in this process
_INFLIGHT: AsyncSaveHandle | None = None
_GROUPS: dict[tuple[int, ...], tuple[Any, dist.ProcessGroup]] = {}


def checkpoint_process_group(process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The dedicated gloo group for checkpoint collectives over the ranks of ``process_group``
    (WORLD by default), created on first use and cached for the life of the default group.

    Returns ``None`` when torch.distributed is not initialized (single-process save).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    default = dist.distributed_c10d._get_default_group()
    world = dist.get_world_size()
    if process_group is None:
        ranks = tuple(range(world))
    else:
        ranks = tuple(dist.get_process_group_ranks(process_group))
    cached = _GROUPS.get(ranks)
    if cached is not None and cached[0] is default:
        return cached[1]
    t0 = time.perf_counter()
    if len(ranks) == world:
        group = dist.new_group(backend="gloo")
    else:  # only the members call new_group
        group = dist.new_group(ranks=list(ranks), backend="gloo", use_local_synchronization=True)
    _GROUPS[ranks] = (default, group)
    logger.info(
        "torch_ucp: created the gloo checkpoint process group over %d ranks in %.3fs",
        len(ranks), time.perf_counter() - t0,
    )
    return group


def _take_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Like ``dcp.save``: ``Stateful`` entries are replaced by their ``state_dict()``."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}


def _make_writer(url_or_writer: Any, storage_options: dict[str, Any]) -> StorageWriter:
    if isinstance(url_or_writer, StorageWriter):
        if storage_options:
            raise TypeError(
                "storage options are passed to the writer's constructor; got a writer object "
                f"and options {sorted(storage_options)}"
            )
        return url_or_writer
    if isinstance(url_or_writer, (str, os.PathLike)):
        return UCPWriter(url_or_writer, **storage_options)
    raise TypeError(f"expected a URL, a path or a StorageWriter, got {type(url_or_writer).__name__}")


# ---------------------------------------------------------------------------------------------
# the saver
# ---------------------------------------------------------------------------------------------


class AsyncSaver:
    """Runs asynchronous saves with one reusable :class:`StagingPool` and one background thread.

    Use one saver for a training run (:func:`async_save` uses a process-wide default one), and
    :meth:`close` it (or use it as a context manager) to release the staging memory::

        with AsyncSaver() as saver:
            for step in range(steps):
                train_step()
                if step % 100 == 0:
                    handle = saver.save({"model": model, "optim": optim}, f"s3://b/run/{step}")
        # the last save is waited for on exit; handle.result() raises if it failed

    Args:
        max_staging_bytes: bound of the staging pool (see :func:`async_save`); default the
            ``TORCH_UCP_MAX_STAGING_BYTES`` knob, else unbounded.
        pin_memory: page-lock the pool (default: when CUDA is available).
    """

    def __init__(self, *, max_staging_bytes: int | None = None, pin_memory: bool | None = None):
        self.max_staging_bytes = max_staging_bytes
        self.pool = StagingPool(pin_memory=pin_memory)
        self._executor: ThreadPoolExecutor | None = None
        self._last: AsyncSaveHandle | None = None

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- public -------------------------------------------------------------------------------
    def save(
        self,
        state_dict: Mapping[str, Any],
        url_or_writer: str | os.PathLike | StorageWriter,
        *,
        planner: SavePlanner | None = None,
        process_group: dist.ProcessGroup | None = None,
        max_staging_bytes: int | None = None,
        **storage_options: Any,
    ) -> AsyncSaveHandle:
        """Stage ``state_dict`` and save it in the background; see :func:`async_save`."""
        global _INFLIGHT
        t_call = time.perf_counter()
        writer = _make_writer(url_or_writer, storage_options)
        bound = next(
            (b for b in (max_staging_bytes, self.max_staging_bytes) if b is not None),
            default_max_staging_bytes(),
        )
        with _CALL_LOCK:
            handle = AsyncSaveHandle(getattr(writer, "checkpoint_id", None))
            stats = handle.stats
            stats.waited = _wait_for(_INFLIGHT, handle.checkpoint_id)
            group = checkpoint_process_group(process_group)

            t0 = time.perf_counter()
            state = _take_state_dict(state_dict)
            t1 = time.perf_counter()
            staged = self.pool.stage(state, max_bytes=bound)
            t2 = time.perf_counter()
            stats.state_dict, stats.staging = t1 - t0, t2 - t1
            stats.pooled_bytes, stats.streamed_bytes = staged.pooled_bytes, staged.streamed_bytes
            stats.pool_allocated = staged.allocated

            run_planner = planner if planner is not None else UCPSavePlanner()
            streaming = None
            if staged.streamed_ids:
                streaming = StreamingPlanner(run_planner, staged.streamed_ids)
                run_planner = streaming
                handle.done().add_done_callback(lambda _: streaming.released.set())
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="ucp-async-save")
            self._executor.submit(
                _run_save, handle, staged.state_dict, writer, run_planner, group, group is None
            )
            del staged, state
            if streaming is not None:  # bounded staging: the writer copies the rest first
                streaming.released.wait()
                stats.streaming = time.perf_counter() - t2
            _INFLIGHT = self._last = handle

        stats.blocked = time.perf_counter() - t_call
        if streaming is not None and not streaming.all_copied:  # the save failed first
            handle._staged.set_exception(handle.done().exception())  # type: ignore[arg-type]
        else:
            handle._staged.set_result(None)
        logger.info(
            "torch_ucp: async save to %s: blocked %.3fs (waited %.3fs for the previous save, "
            "state_dict %.3fs, staged %.1f MiB in %.3fs%s); writing in the background",
            handle.checkpoint_id, stats.blocked, stats.waited, stats.state_dict,
            stats.pooled_bytes / 2**20, stats.staging,
            f", streamed {stats.streamed_bytes / 2**20:.1f} MiB in {stats.streaming:.3f}s"
            if streaming is not None else "",
        )
        return handle

    def wait(self, timeout: float | None = None) -> None:
        """Wait for this saver's last save to finish (without raising its error)."""
        if self._last is not None:
            wait_futures([self._last.done()], timeout=timeout)

    def close(self) -> None:
        """Wait for the save in flight, stop the background thread and release the pool."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.pool.close()


def _wait_for(previous: AsyncSaveHandle | None, next_id: str | None) -> float:
    if previous is None or previous.done().done():
        return 0.0
    logger.info(
        "torch_ucp: async save to %s waits for the previous save to %s to finish",
        next_id, previous.checkpoint_id,
    )
    t0 = time.perf_counter()
    wait_futures([previous.done()])
    waited = time.perf_counter() - t0
    logger.info(
        "torch_ucp: waited %.3fs for the previous save to %s (%s)",
        waited, previous.checkpoint_id, "failed" if previous.done().exception() else "committed",
    )
    return waited


def _run_save(
    handle: AsyncSaveHandle,
    staged_state: dict[str, Any],
    writer: StorageWriter,
    planner: SavePlanner,
    group: dist.ProcessGroup | None,
    no_dist: bool,
) -> None:
    """The background part: ``dcp.save`` of the staged state on the checkpoint group."""
    t0 = time.perf_counter()
    try:
        metadata = dcp.save(
            staged_state,
            storage_writer=writer,
            planner=planner,
            process_group=group,
            no_dist=no_dist,
        )
    except BaseException as e:  # noqa: BLE001 - handed to the caller via result()
        handle.stats.background = time.perf_counter() - t0
        logger.error("torch_ucp: async save to %s failed: %s", handle.checkpoint_id, e)
        handle._done.set_exception(e)
        return
    finally:
        del staged_state
    handle.stats.background = time.perf_counter() - t0
    logger.info(
        "torch_ucp: async save to %s committed in %.3fs", handle.checkpoint_id, handle.stats.background
    )
    handle._done.set_result(metadata)


# ---------------------------------------------------------------------------------------------
# module-level API
# ---------------------------------------------------------------------------------------------

_DEFAULT_SAVER: AsyncSaver | None = None
_DEFAULT_LOCK = threading.Lock()


def default_saver() -> AsyncSaver:
    """The process-wide :class:`AsyncSaver` used by :func:`async_save`."""
    global _DEFAULT_SAVER
    with _DEFAULT_LOCK:
        if _DEFAULT_SAVER is None:
            _DEFAULT_SAVER = AsyncSaver()
        return _DEFAULT_SAVER


def async_save(
    state_dict: Mapping[str, Any],
    url_or_writer: str | os.PathLike | StorageWriter,
    *,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    max_staging_bytes: int | None = None,
    **storage_options: Any,
) -> AsyncSaveHandle:
    """Save ``state_dict`` asynchronously; return once it is staged in host memory.

    The caller is blocked for: waiting for a previous save still in flight (at most one per
    process), calling ``state_dict()`` on ``Stateful`` entries, and copying the tensors into a
    reusable staging pool (:class:`StagingPool`). Planning, checksums, writing and the commit
    then run in a background thread with ``dcp.save(staged, storage_writer=..., planner=...,
    process_group=<dedicated gloo group>)``.

    Every rank of ``process_group`` must call it, like ``dcp.save``.

    Args:
        state_dict: what ``dcp.save`` takes: nested dicts/lists of tensors, DTensors, other
            values, and ``Stateful`` objects at the top level.
        url_or_writer: a checkpoint URL or path (saved with :class:`torch_ucp.UCPWriter`) or
            any DCP ``StorageWriter``.
        planner: the save planner (default: a new :class:`torch_ucp.UCPSavePlanner`).
        process_group: ranks taking part (default WORLD). Checkpoint collectives run on a
            dedicated gloo group over the same ranks, created once and cached.
        max_staging_bytes: bound of the staging pool (default the
            ``TORCH_UCP_MAX_STAGING_BYTES`` knob, else unbounded). A larger state is staged in
            part and the rest is copied by the writer while the caller waits: the caller is
            then blocked for roughly the time to write the part that did not fit.
        **storage_options: passed to :class:`torch_ucp.UCPWriter` with a URL
            (``endpoint_url=``, ``key=`` ...).

    Returns:
        An :class:`AsyncSaveHandle`: ``result()`` waits and re-raises a failure.
    """
    return default_saver().save(
        state_dict,
        url_or_writer,
        planner=planner,
        process_group=process_group,
        max_staging_bytes=max_staging_bytes,
        **storage_options,
    )


def close() -> None:
    """Wait for the save in flight and release the default saver's staging memory."""
    global _DEFAULT_SAVER
    with _DEFAULT_LOCK:
        saver, _DEFAULT_SAVER = _DEFAULT_SAVER, None
    if saver is not None:
        saver.close()
