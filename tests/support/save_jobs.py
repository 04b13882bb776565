"""Long-lived save jobs for the concurrent-save tests: each is a separate process (its own
interpreter, as two training jobs are) that runs ``dcp.save`` with ``UCPWriter`` when told to,
at a given wall-clock time, and reports what happened."""

from __future__ import annotations

import multiprocessing
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch


def job_state(seed: int, tensors: int, rows: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"w{i}": torch.randn(rows, 1024, generator=g) for i in range(tensors)},
        "seed": seed,
        "betas": (0.9, 0.999),
    }


@dataclass
class Outcome:
    ok: bool
    save_id: str | None = None
    error: str = ""  # exception type name
    message: str = ""
    checkpoint_error: bool = False  # a torch_ucp CheckpointError (a clean failure)
    started: float = 0.0
    ended: float = 0.0


def _serve(conn: Any, tensors: int, rows: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from torch_ucp import CheckpointError, UCPSavePlanner, UCPWriter

    warnings.simplefilter("ignore")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        url, options, overwrite, seed, start_at = msg
        time.sleep(max(0.0, start_at - time.time()))
        started = time.time()
        writer = UCPWriter(url, overwrite=overwrite, **options)
        try:
            dcp.save(job_state(seed, tensors, rows), storage_writer=writer, planner=UCPSavePlanner(),
                     no_dist=True)
            conn.send(Outcome(True, writer.save_id, started=started, ended=time.time()))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            exc = e
            if isinstance(e, CheckpointException):
                exc = next(iter(e.failures.values()))[0]
            conn.send(Outcome(False, writer.save_id, type(exc).__name__, str(exc),
                              isinstance(exc, CheckpointError), started, time.time()))


class SaveJob:
    """A process saving on request: ``start(...)`` then ``result()``."""

    def __init__(self, tensors: int, rows: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, tensors, rows), daemon=True)
        self._proc.start()

    def start(self, url: str, options: dict[str, Any], overwrite: bool, seed: int, at: float) -> None:
        self._conn.send((url, options, overwrite, seed, at))

    def result(self, timeout: float = 120.0) -> Outcome:
        if not self._conn.poll(timeout):
            raise TimeoutError("save job did not answer")
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
