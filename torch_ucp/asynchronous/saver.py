"""Asynchronous save: stage on the caller, plan and write in a background thread.

Timeline of one :meth:`AsyncSaver.save` on every rank::

    caller   | wait for the previous save | state_dict() | prepare | copy into the pool | return
    ckpt thr |                                                          dcp.save(staged) on the
             |                                                          gloo checkpoint group:
             |                                                          plan, write, checksums,
             |                                                          commit (coordinator)

With ``stage_before_step=optimizer`` the copy moves to the checkpoint thread too: the caller
returns right after ``state_dict()`` and the cheap *prepare* step, the copy overlaps the next
forward and backward (which read the parameters and optimizer state but do not write them), and
the optimizer's next ``step()`` waits until the copy is complete (a step pre-hook). The caller
is then blocked for ``state_dict()`` plus whatever part of the copy is not hidden behind
forward and backward (``stats.step_wait``).

* **One save in flight per process.** A new save first waits for the previous one to finish
  (it logs that it waits, and how long), so staged copies never pile up and the staging pool
  can be reused.
* **Dedicated checkpoint process group.** The background ``dcp.save`` runs its collectives on a
  gloo group over the same ranks as ``process_group`` (or WORLD), created once per process with
  ``dist.new_group(backend="gloo")`` and cached: they never interleave with training
  collectives on the default group (NCCL or gloo). Its first creation is a collective over
  those ranks, so every rank calls the first ``async_save`` (as it must anyway).
* **Failures.** A save that fails on any rank fails on all of them: DCP gathers every rank's
  result, and a failure on the caller's side (``state_dict()``, staging) is fed into the
  background save so the peers do not wait for this rank forever. :class:`torch_ucp.UCPWriter`
  writes ``.metadata`` only after all ranks wrote their data, so nothing is committed;
  ``handle.result()`` re-raises the error.
* **Thread, not process.** The background work shares the GIL with training, but its heavy
  parts (copies, file and socket I/O, checksums) release it.
* **Never lost.** Interpreter exit and ``dist.destroy_process_group()`` wait for the save in
  flight, and a failure nobody looked at ends the process with exit status 1
  (:mod:`~torch_ucp.asynchronous.inflight`). :func:`torch_ucp.wait` waits explicitly and
  re-raises a failure.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageWriter

from torch_ucp import knobs
from torch_ucp.asynchronous import inflight
from torch_ucp.asynchronous.staging import PreparedState, StagedState, StagingPool
from torch_ucp.asynchronous.streaming import StreamingPlanner
from torch_ucp.planner import UCPSavePlanner
from torch_ucp.storage import UCPWriter

logger = logging.getLogger(__name__)

MAX_STAGING_BYTES_ENV = "TORCH_UCP_MAX_STAGING_BYTES"

Optimizers = torch.optim.Optimizer | Iterable[torch.optim.Optimizer]


def default_max_staging_bytes() -> int | None:
    """The knob ``TORCH_UCP_MAX_STAGING_BYTES`` (unset or 0: no bound)."""
    value = knobs.max_staging_bytes()
    return value if value > 0 else None


# ---------------------------------------------------------------------------------------------
# the handle
# ---------------------------------------------------------------------------------------------


@dataclass
class AsyncSaveStats:
    """Where the time of one save went (seconds) and what was staged (bytes), on this rank.

    The caller was blocked for ``blocked + step_wait`` in total.

    Attributes:
        waited: in the call, waiting for the previous save to finish.
        state_dict: in the call, ``state_dict()`` of ``Stateful`` entries.
        staging: preparing (in the call) and copying into the pool (in the call, or in the
            background with ``stage_before_step``).
        streaming: bounded staging: waiting in the call for the writer to copy the streamed
            tensors.
        blocked: the whole ``async_save`` call, as the caller saw it.
        step_wait: with ``stage_before_step``: optimizer steps waiting for staging to finish.
        background: the background part (copy if deferred, plan, write, commit).
        pooled_bytes: bytes staged in the pool.
        streamed_bytes: bytes the writer copied out of live tensors (bounded staging).
        pool_allocated: whether this save (re-)allocated the pool's arena.
    """

    waited: float = 0.0
    state_dict: float = 0.0
    staging: float = 0.0
    streaming: float = 0.0
    blocked: float = 0.0
    step_wait: float = 0.0
    background: float | None = None
    pooled_bytes: int = 0
    streamed_bytes: int = 0
    pool_allocated: bool = False


class AsyncSaveHandle:
    """The running save returned by :func:`async_save`.

    ``staged()`` resolves once the state is copied out of the training tensors (training may
    then change them); ``done()`` resolves to DCP's :class:`Metadata` once the checkpoint is
    committed, or holds the error. Without ``stage_before_step`` (and without bounded staging
    in the background), ``staged()`` is already resolved when ``async_save`` returns.
    """

    def __init__(self, checkpoint_id: str | None) -> None:
        self.checkpoint_id = checkpoint_id
        self.stats = AsyncSaveStats()
        self._staged: Future[None] = Future()
        self._done: inflight.ObservedFuture = inflight.ObservedFuture()  # of Metadata
        self._lock = threading.Lock()

    def staged(self) -> Future[None]:
        """Future resolved when the state has been staged (training may mutate it)."""
        return self._staged

    def done(self) -> Future[Metadata]:
        """Future resolved when the checkpoint is committed (or failed)."""
        return self._done

    def result(self, timeout: float | None = None) -> Metadata:
        """Wait for the save; return DCP's metadata or re-raise the save's error (DCP's
        ``CheckpointException`` names every failed rank with its traceback)."""
        return self._done.result(timeout)

    def _mark_staged(self) -> None:
        with self._lock:
            if not self._staged.done():
                self._staged.set_result(None)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if not self._staged.done():
                self._staged.set_exception(error)
        self._done.set_exception(error)

    def __repr__(self) -> str:
        state = "running"
        if self._done.done():
            state = "failed" if self._done.exception() is not None else "committed"
        return f"AsyncSaveHandle({self.checkpoint_id!r}, {state})"


# ---------------------------------------------------------------------------------------------
# process-wide state: the checkpoint process groups (the saves in flight: inflight.py)
# ---------------------------------------------------------------------------------------------

_CALL_LOCK = threading.Lock()  # one async_save call at a time in this process
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


def _optimizers(arg: Optimizers | None) -> list[torch.optim.Optimizer] | None:
    if arg is None:
        return None
    optimizers = [arg] if isinstance(arg, torch.optim.Optimizer) else list(arg)
    for o in optimizers:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"stage_before_step takes optimizers, got {type(o).__name__}")
    return optimizers


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
                    handle = saver.save({"app": app_state}, f"s3://b/run/{step}",
                                        stage_before_step=optimizer)
        # the last save is waited for on exit; handle.result() raises if it failed

    Args:
        max_staging_bytes: bound of the staging pool (see :func:`async_save`); default the
            ``TORCH_UCP_MAX_STAGING_BYTES`` knob, else unbounded.
        pin_memory: page-lock the pool (default: when CUDA is available).
        pool: a staging pool to use instead of a new one.
    """

    def __init__(
        self,
        *,
        max_staging_bytes: int | None = None,
        pin_memory: bool | None = None,
        pool: StagingPool | None = None,
    ) -> None:
        self.max_staging_bytes = max_staging_bytes
        self.pool = pool if pool is not None else StagingPool(pin_memory=pin_memory)
        self._executor: ThreadPoolExecutor | None = None
        self._last: AsyncSaveHandle | None = None
        self._step_guards: dict[int, Any] = {}  # id(optimizer) -> hook handle

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
        stage_before_step: Optimizers | None = None,
        **storage_options: Any,
    ) -> AsyncSaveHandle:
        """Stage ``state_dict`` and save it in the background; see :func:`async_save`."""
        t_call = time.perf_counter()
        writer = _make_writer(url_or_writer, storage_options)
        optimizers = _optimizers(stage_before_step)
        bound = next(
            (b for b in (max_staging_bytes, self.max_staging_bytes) if b is not None),
            default_max_staging_bytes(),
        )
        with _CALL_LOCK:
            handle = AsyncSaveHandle(getattr(writer, "checkpoint_id", None))
            stats = handle.stats
            stats.waited = _wait_for(inflight.latest(), handle.checkpoint_id)
            group = checkpoint_process_group(process_group)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="ucp-async-save")
            job = _SaveJob(handle, writer, group, self.pool)
            try:
                t0 = time.perf_counter()
                state = _take_state_dict(state_dict)
                t1 = time.perf_counter()
                prepared = self.pool.prepare(state, max_bytes=bound)
                del state
                stats.state_dict, stats.staging = t1 - t0, time.perf_counter() - t1
                job.set_planner(planner if planner is not None else UCPSavePlanner(), prepared)
                if optimizers is None:  # copy now, on the caller
                    t2 = time.perf_counter()
                    job.staged = self.pool.copy(prepared)
                    stats.staging += time.perf_counter() - t2
                else:  # copy in the background, before the optimizers' next step
                    job.prepared = prepared
                    for optim in optimizers:
                        self._guard(optim)
                del prepared
            except BaseException as e:
                job.error = e  # the peers are about to save: fail it on every rank
                self._start(job, group)
                handle._done.seen = True  # this caller gets the error right here
                raise
            self._start(job, group)
            if optimizers is None and job.streaming is not None:
                t3 = time.perf_counter()  # bounded staging: the writer copies the rest first
                wait_futures([handle.staged()])
                stats.streaming = time.perf_counter() - t3

        stats.blocked = time.perf_counter() - t_call
        logger.info(
            "torch_ucp: async save to %s: blocked %.3fs (waited %.3fs for the previous save, "
            "state_dict %.3fs, staging %.3fs%s)%s",
            handle.checkpoint_id, stats.blocked, stats.waited, stats.state_dict, stats.staging,
            f", streaming {stats.streaming:.3f}s" if stats.streaming else "",
            "; staging continues until the next optimizer step" if optimizers is not None else "",
        )
        return handle

    def wait(self, timeout: float | None = None) -> None:
        """Wait for this saver's last save to finish (without raising its error)."""
        if self._last is not None:
            wait_futures([self._last.done()], timeout=timeout)

    def close(self) -> None:
        """Wait for the save in flight, stop the background thread, remove the optimizer step
        guards and release the pool."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for hook in self._step_guards.values():
            hook.remove()
        self._step_guards.clear()
        self.pool.close()

    # -- internals ----------------------------------------------------------------------------
    def _start(self, job: _SaveJob, group: Any) -> None:
        assert self._executor is not None
        self._last = job.handle
        inflight.track(job.handle, group)
        self._executor.submit(job.run)

    def _guard(self, optim: torch.optim.Optimizer) -> None:
        """Make ``optim.step()`` wait until this saver's last save is staged (one step pre-hook
        per optimizer, kept until :meth:`close`)."""
        if id(optim) in self._step_guards:
            return

        def wait_for_staging(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            handle = self._last
            if handle is None or handle.staged().done():
                return
            t0 = time.perf_counter()
            wait_futures([handle.staged()])
            waited = time.perf_counter() - t0
            handle.stats.step_wait += waited
            logger.info(
                "torch_ucp: %s.step() waited %.3fs for the async save to %s to finish staging",
                type(opt).__name__, waited, handle.checkpoint_id,
            )

        self._step_guards[id(optim)] = optim.register_step_pre_hook(wait_for_staging)


class _FailedStaging(SavePlanner):
    """Fails local planning with the caller's error, so every rank's save fails together."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        raise self.error

    def create_local_plan(self) -> Any:  # pragma: no cover - never reached
        raise self.error

    def create_global_plan(self, all_plans: Any) -> Any:  # pragma: no cover
        raise self.error

    def finish_plan(self, new_plan: Any) -> Any:  # pragma: no cover
        raise self.error

    def resolve_data(self, write_item: Any) -> Any:  # pragma: no cover
        raise self.error


class _SaveJob:
    """The background part of one save: finish staging if the caller did not, then
    ``dcp.save`` the staged state on the checkpoint group."""

    def __init__(self, handle: AsyncSaveHandle, writer: StorageWriter, group: Any, pool: StagingPool):
        self.handle, self.writer, self.group, self.pool = handle, writer, group, pool
        self.planner: SavePlanner | None = None
        self.streaming: StreamingPlanner | None = None
        self.prepared: PreparedState | None = None  # staging left to the background
        self.staged: StagedState | None = None  # staging done by the caller
        self.error: BaseException | None = None  # the caller failed: fail on every rank

    def set_planner(self, planner: SavePlanner, prepared: PreparedState) -> None:
        streamed = {id(leaf.source): leaf for leaf in prepared.leaves if not leaf.pooled}
        if streamed:
            self.streaming = StreamingPlanner.around(planner, streamed, on_release=self.handle._mark_staged)
            planner = self.streaming
        self.planner = planner

    def run(self) -> None:
        handle, stats = self.handle, self.handle.stats
        t0 = time.perf_counter()
        state: dict[str, Any] = {}
        planner = self.planner
        if self.error is not None:
            planner = _FailedStaging(self.error)
        elif self.prepared is not None:
            try:
                self.staged = self.pool.copy(self.prepared)
                stats.staging += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - e.g. StagingRaceError: fail on every rank
                planner = _FailedStaging(e)
            self.prepared = None
        if self.staged is not None:
            state = self.staged.state_dict
            stats.pooled_bytes = self.staged.pooled_bytes
            stats.streamed_bytes = self.staged.streamed_bytes
            stats.pool_allocated = self.staged.allocated
            self.staged = None
            if self.streaming is None:
                handle._mark_staged()
        try:
            metadata = dcp.save(
                state,
                storage_writer=self.writer,
                planner=planner,
                process_group=self.group,
                no_dist=self.group is None,
            )
        except BaseException as e:  # noqa: BLE001 - handed to the caller via result()
            stats.background = time.perf_counter() - t0
            abandoned = inflight.group_destroyed_error(handle.checkpoint_id, self.group)
            if abandoned is not None:  # say why, instead of DCP's collective errors
                abandoned.__cause__ = e
                e = abandoned
            logger.error("torch_ucp: async save to %s failed: %s", handle.checkpoint_id, e)
            handle._fail(e)
            return
        finally:
            del state
            if self.streaming is not None:
                self.streaming.released.set()
        stats.background = time.perf_counter() - t0
        logger.info(
            "torch_ucp: async save to %s committed in %.3fs", handle.checkpoint_id, stats.background
        )
        handle._mark_staged()  # (a planner without a state_dict never released the caller)
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
    stage_before_step: Optimizers | None = None,
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
            part and the writer copies the rest out of the live tensors before the state is
            considered staged: the caller is then blocked for roughly the time to write the
            part that did not fit (see :mod:`torch_ucp.asynchronous.staging`).
        stage_before_step: optimizers whose updates are the only in-place changes of the
            state until their next ``step()`` (the usual training loop: forward and backward
            only read parameters and optimizer state). The copy into the pool then runs in the
            background, overlapping forward and backward, and each of these optimizers'
            next ``step()`` waits until it is complete. Anything else that changes the state
            in place before ``handle.staged()`` resolves (e.g. BatchNorm running statistics
            in forward) must wait for ``handle.staged()`` first. As a safety net, a change
            made through a tensor of the state dict (or a view of it) before it is copied is
            caught by its version counter and fails the save on every rank instead of writing
            a torn checkpoint; a change through another tensor over the same memory is not
            seen (FSDP2's ``state_dict()`` returns such tensors for its parameters).
            The call returns sooner, but the copy still competes with training for the same
            cores: measured as training time lost per save, it did not beat the default
            (docs/PERFORMANCE.md, ``benchmarks/async_save_bench.py``).
        **storage_options: passed to :class:`torch_ucp.UCPWriter` with a URL
            (``endpoint_url=``, ``key=`` ..., and its own options such as ``allow_pickle=True``).

    Returns:
        An :class:`AsyncSaveHandle`: ``result()`` waits and re-raises a failure.
    """
    return default_saver().save(
        state_dict,
        url_or_writer,
        planner=planner,
        process_group=process_group,
        max_staging_bytes=max_staging_bytes,
        stage_before_step=stage_before_step,
        **storage_options,
    )


def close() -> None:
    """Wait for the save in flight and release the default saver's staging memory."""
    global _DEFAULT_SAVER
    with _DEFAULT_LOCK:
        saver, _DEFAULT_SAVER = _DEFAULT_SAVER, None
    if saver is not None:
        saver.close()
