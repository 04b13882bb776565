"""Run a function on N CPU processes joined by a gloo process group (demo and tests).

Each rank's return value (JSON-serializable) is collected; an exception on any rank is
re-raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
    )
    try:
        result = fn(*args)
        with open(os.path.join(workdir, f"result-{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        with open(os.path.join(workdir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


class RankFailedError(RuntimeError):
    pass


def _start_method() -> str:
    """``forkserver`` with torch preloaded: ranks fork from a server that imported torch once
    (a fresh ``spawn`` re-imports it in every rank, seconds each on a small machine)."""
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.set_forkserver_preload(
        ["torch", "torch.distributed.checkpoint", "torch.distributed.tensor", "torch_ucp"]
    )
    return "forkserver"


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
