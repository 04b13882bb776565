"""Asynchronous save measured as training time lost.

    python benchmarks/async_save_bench.py [--layers 16] [--dim 1536] [--batch 64] [--rounds 3]
                                          [--steps 1,3,10] [--modes ...] [--device cpu|cuda]

Two gloo ranks train an MLP of ``--layers`` Linear(dim, dim) layers with FSDP2 and AdamW (the
default, 16 x 1536^2, is 453 MiB of model and optimizer state, 226 MiB per rank) and save
``{"train": Stateful(model, optim), "step": n}`` in each mode, all modes interleaved in one pair
of processes (each async mode with its own staging pool):

* ``sync``: ``dcp.save`` with ``UCPWriter`` and ``UCPSavePlanner`` (the reference);
* ``async default``: ``torch_ucp.async_save`` (the caller copies into the staging pool);
* ``async stage_before_step``: the same with ``stage_before_step=optimizer`` (the copy runs in
  the background and the optimizer's next step waits for it);
* ``async bounded``: the same with ``max_staging_bytes`` = ``--bounded-fraction`` of the state
  (the writer copies the rest while the caller waits);
* ``stock dcp.async_save``: ``dcp.async_save(storage_writer=FileSystemWriter,
  process_group=<gloo>)``, the reference for async.

**Training time lost per save** for N steps: the wall time from the save call until N training
steps are done *and* the save is committed (what a save every N steps costs: the next save
would wait for this one), minus the wall time of N steps with no save, measured in the same
processes right before. Each round runs every mode for N = 1, 3, 10 in turn, so load from
other processes on the machine affects all modes alike; the table has the median over
``--rounds`` rounds of the worse rank.
``blocked`` is how long the save call itself kept the caller; ``save`` is call to commit.

With ``--device cuda`` (where CUDA exists; skipped elsewhere) one process trains the same MLP
on one GPU without FSDP (gloo has no CUDA reduce-scatter), so the state is plain CUDA tensors
staged into the pinned pool with copies on a side stream.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_ucp import UCPSavePlanner, UCPWriter  # noqa: E402
from torch_ucp.asynchronous import AsyncSaver  # noqa: E402
from torch_ucp.demo.launch import run_distributed  # noqa: E402

MODES = ["sync", "async default", "async stage_before_step", "async bounded",
         "stock dcp.async_save"]
STEPS = (1, 3, 10)


class TrainState(Stateful):
    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError


# -- memory helpers (also used by support_measure.py) -------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Return the memory training freed to the OS, so that a save reusing it shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakRSS:
    """Samples this process's RSS (or another ``read()``, bytes) every ``interval`` seconds in a
    thread."""

    def __init__(self, interval: float = 0.002, read: Callable[[], int] = _rss) -> None:
        self.interval, self.read, self.peak = interval, read, read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


# -- saving in each mode (also used by compare.py) ---------------------------------------------


class _Saving:
    """One save in ``mode``: :meth:`start` returns when the caller is released.

    ``mode`` is one of :data:`MODES` (``"async ucp"`` / ``"async stock"`` are accepted as
    the names compare.py uses).
    """

    def __init__(self, mode: str, saver: AsyncSaver, optim: torch.optim.Optimizer | None,
                 group: Any, bounded_bytes: int | None = None) -> None:
        self.mode = {"async ucp": "async default", "async stock": "stock dcp.async_save"}.get(mode, mode)
        self.saver, self.optim, self.group, self.bounded_bytes = saver, optim, group, bounded_bytes

    def start(self, app: dict[str, Any], url: str) -> tuple[Any, Any]:
        """Returns ``(future of the committed save or None if synchronous, torch_ucp handle)``."""
        mode = self.mode
        if mode == "sync":
            dcp.save(app, storage_writer=UCPWriter(url), planner=UCPSavePlanner())
            return None, None
        if mode.startswith("async"):
            handle = self.saver.save(
                app, url,
                stage_before_step=self.optim if mode == "async stage_before_step" else None,
                max_staging_bytes=self.bounded_bytes if mode == "async bounded" else None,
            )
            return handle.done(), handle
        if mode == "stock dcp.async_save":
            f = dcp.async_save(app, storage_writer=dcp.FileSystemWriter(url), process_group=self.group)
            return getattr(f, "upload_completion", f), None
        raise ValueError(mode)


# -- one rank ----------------------------------------------------------------------------------


def _mlp(layers: int, dim: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(dim, dim, bias=False), torch.nn.ReLU())
          for _ in range(layers)]
    ).to(device)


def _local_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, list):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        t = state.to_local() if hasattr(state, "to_local") else state
        return t.numel() * t.element_size()
    return 0


def bench_rank(modes: list[str], base: str, layers: int, dim: int, batch: int, rounds: int,
               steps: list[int], bounded_fraction: float, device: str) -> dict[str, Any]:
    """``rounds`` x (for each mode, for each N: N steps alone, then a save and N steps), all
    modes interleaved in one pair of processes so that load from other processes on the machine
    affects every mode alike; seconds per window."""
    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())
    model = _mlp(layers, dim, device)
    if device == "cpu":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(batch, dim, generator=gen, device=device)

    def train_step() -> None:
        model(x).square().mean().backward()
        optim.step()
        optim.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # optimizer state exists from here on
        train_step()
    app = {"train": TrainState(model, optim), "step": 0}
    state_bytes = _local_bytes(TrainState(model, optim).state_dict())
    group = dist.new_group(backend="gloo")  # stock dcp.async_save's, as TorchTitan makes one
    savers = {m: AsyncSaver() for m in modes if m.startswith("async")}  # a staging pool each
    savings = {m: _Saving(m, savers.get(m), optim, group,
                          bounded_bytes=int(state_bytes * bounded_fraction)) for m in modes}
    rank = dist.get_rank()
    counter = iter(range(10**6))

    def save_window(mode: str, n: int) -> dict[str, float]:
        url = os.path.join(base, f"save-{next(counter)}")
        dist.barrier()
        t0 = time.perf_counter()
        done, handle = savings[mode].start(app, url)
        blocked = time.perf_counter() - t0
        committed = [t0 + blocked if done is None else None]
        if done is not None:
            done.add_done_callback(lambda _: committed.__setitem__(0, time.perf_counter()))
        for _ in range(n):
            train_step()
        if done is not None:
            done.result()
        window = time.perf_counter() - t0
        if handle is not None:
            blocked += handle.stats.step_wait  # optimizer steps that waited for staging
        dist.barrier()
        if rank == 0:
            shutil.rmtree(url, ignore_errors=True)
        return {"window": window, "blocked": blocked, "save": committed[0] - t0}

    def steps_window(n: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            train_step()
        return time.perf_counter() - t0

    for mode in modes:  # first save of each: staging pool, checkpoint group, page cache
        save_window(mode, 1)
    out: dict[str, Any] = {"state_bytes": state_bytes, "rounds": {m: [] for m in modes}}
    for r in range(rounds):
        if rank == 0:
            print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for mode in modes:
            row = {}
            for n in steps:
                alone = steps_window(n)
                row[str(n)] = {"alone": alone, **save_window(mode, n)}
            out["rounds"][mode].append(row)
    out["step"] = statistics.median(steps_window(1) for _ in range(3))
    for saver in savers.values():
        saver.close()
    return out


# -- table -------------------------------------------------------------------------------------


def summarize(per_rank: list[dict[str, Any]], steps: list[int]) -> list[dict[str, Any]]:
    """One row per mode: per round the worse rank's windows, then the median over rounds."""
    rows = []
    step = max(r["step"] for r in per_rank)
    for mode in per_rank[0]["rounds"]:
        row: dict[str, Any] = {"mode": mode, "state_bytes": per_rank[0]["state_bytes"], "step": step}
        blocked, save = [], []
        for n in map(str, steps):
            lost = []
            for i in range(len(per_rank[0]["rounds"][mode])):
                windows = [r["rounds"][mode][i][n] for r in per_rank]
                lost.append(max(w["window"] for w in windows) - max(w["alone"] for w in windows))
                blocked.append(max(w["blocked"] for w in windows))
                save.append(max(w["save"] for w in windows))
            row[f"lost{n}"] = statistics.median(lost)
        row["blocked"] = statistics.median(blocked)
        row["save"] = statistics.median(save)
        rows.append(row)
    sync = next((r["save"] for r in rows if r["mode"] == "sync"), None)
    for r in rows:
        r["vs_sync"] = {n: r[f"lost{n}"] / sync if sync else None for n in steps}
    return rows


def format_table(rows: list[dict[str, Any]], steps: list[int]) -> str:
    def cell(v: float | None, fmt: str, width: int) -> str:
        return (format(v, fmt) if v is not None else "-").rjust(width)

    head = f"{'mode':<25}{'blocked s':>10}{'save s':>8}" + "".join(
        f"{f'lost N={n}':>11}{'/sync':>7}" for n in steps)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<25}{cell(r['blocked'], '.3f', 10)}{cell(r['save'], '.3f', 8)}"
            + "".join(f"{cell(r[f'lost{n}'], '.3f', 11)}{cell(r['vs_sync'][n], '.2f', 7)}"
                      for n in steps)
        )
    return "\n".join(lines)


def run(layers: int, dim: int, batch: int, rounds: int, steps: list[int], bounded_fraction: float,
        directory: str, modes: list[str] = MODES, device: str = "cpu") -> list[dict[str, Any]]:
    world = 2 if device == "cpu" else 1
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    try:
        per_rank = run_distributed(bench_rank, world, modes, directory, layers, dim, batch,
                                   rounds, steps, bounded_fraction, device)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return summarize(per_rank, steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="values of N")
    p.add_argument("--bounded-fraction", type=float, default=0.25)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dir", default="/tmp/ucp-async-bench")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; skipped")
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    steps = [int(s) for s in args.steps.split(",")]
    rows = run(args.layers, args.dim, args.batch, args.rounds, steps, args.bounded_fraction,
               args.dir, modes, args.device)
    state = rows[0]["state_bytes"]
    world = 2 if args.device == "cpu" else 1
    print(f"{args.device}: {args.layers} x {args.dim}^2 MLP + AdamW, {world * state / 2**20:.0f} MiB "
          f"of state ({state / 2**20:.0f} MiB per rank, {world} rank(s)"
          f"{', FSDP2' if args.device == 'cpu' else ''}), batch {args.batch}, training step "
          f"{rows[0]['step']:.3f} s; {os.cpu_count()} cores; medians of {args.rounds} rounds\n")
    print(format_table(rows, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
