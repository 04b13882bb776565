"""Run a function on N CPU processes joined by a gloo process group (demo and tests).

Each rank's return value (JSON-serializable) is collected; an exception on any rank is
re-raised in the parent with that rank's traceback.

Ranks leave with :func:`exit_rank`, never through interpreter finalization. A gloo process
group usually outlives ``destroy_process_group()`` (FSDP2 and DTensor state keep references),
so its worker threads are still running at exit. A worker that has just finished a collective
drops its tensors, which needs the GIL; if the main thread is finalizing by then, CPython ends
the worker with ``pthread_exit`` inside a ``noexcept`` destructor, and C++ aborts the process
(``terminate called without an active exception``, SIGABRT after the work succeeded; seen in a
core dump: ``~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
``PyThread_exit_thread``, with the main thread in ``Py_FinalizeEx``). Skipping finalization
removes that race; Python threads and ``atexit`` handlers still run first.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_ucp import knobs


def exit_rank(code: int) -> NoReturn:
    """End this rank's process with ``code`` as a normal exit would, minus the finalization.

    Does what the interpreter does first at exit: ``threading._shutdown()`` (its exit hooks,
    e.g. stopping thread pools, then joining non-daemon threads; ``multiprocessing`` calls it
    the same way when a child exits) and the ``atexit`` handlers; then flushes stdout and
    stderr and calls ``os._exit``, so C++ threads of process groups still alive are not torn
    down while they may need the GIL (see the module docstring).
    """
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - reported as Python does at exit, then exit
        traceback.print_exc()
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _intra_op_threads() -> int:
    """Threads per rank for torch's CPU kernels: ``OMP_NUM_THREADS`` if the caller set it, else 1,
    as ``torchrun`` does for several processes per node."""
    value = os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"OMP_NUM_THREADS={value!r}: expected a positive integer") from None


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    # Set explicitly: ranks fork from a server that imported torch already, so the environment
    # variable alone comes too late. Without it every rank runs one OpenMP thread per core,
    # and on a small host their spinning barriers starve the other ranks.
    torch.set_num_threads(_intra_op_threads())
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
    )
    code = 1
    try:
        result = fn(*args)
        with open(os.path.join(workdir, f"result-{rank}.json"), "w") as f:
            json.dump(result, f)
        code = 0
    except BaseException:
        with open(os.path.join(workdir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        try:
            dist.destroy_process_group()
        finally:
            exit_rank(code)


class RankFailedError(RuntimeError):
    """A rank failed; the message holds each failed rank's traceback (``--- rank N ---``)."""

    @property
    def summary(self) -> str:
        """One line: each failed rank's final traceback line (the error itself)."""
        parts = []
        for block in str(self).split("--- rank ")[1:]:
            rank, _, trace = block.partition(" ---\n")
            lines = [line for line in trace.splitlines() if line.strip()]
            parts.append(f"rank {rank}: {lines[-1] if lines else 'failed'}")
        return "; ".join(parts) or str(self)


def _start_method() -> str:
    """``forkserver`` with torch preloaded: ranks fork from a server that imported torch once
    (a fresh ``spawn`` re-imports it in every rank, seconds each on a small machine)."""
    method = knobs.launch_start_method()
    if method not in mp.get_all_start_methods():
        method = "spawn"
    if method == "forkserver":
        mp.set_forkserver_preload(
            ["torch", "torch.distributed.checkpoint", "torch.distributed.tensor", "torch_ucp"]
        )
    return method


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes; return each rank's result."""
    with tempfile.TemporaryDirectory(prefix="ucp-launch-") as workdir:
        try:
            mp.start_processes(
                _entry,
                args=(fn, world_size, workdir, args),
                nprocs=world_size,
                join=True,
                start_method=_start_method(),
            )
        except Exception as e:
            errors = []
            for rank in range(world_size):
                path = os.path.join(workdir, f"error-{rank}.txt")
                if os.path.exists(path):
                    with open(path) as f:
                        errors.append(f"--- rank {rank} ---\n{f.read()}")
            raise RankFailedError("\n".join(errors) or str(e)) from None
        results = []
        for rank in range(world_size):
            with open(os.path.join(workdir, f"result-{rank}.json")) as f:
                results.append(json.load(f))
        return results
