"""Asynchronous save during a CPU training loop: what the caller pays, and what training pays.

    python benchmarks/async_save_bench.py [--size-mb 300] [--saves 6] [--steps-per-save 3]
                                          [--bounded-fraction 0.25] [--dir /tmp/ucp-async-bench]

Two gloo ranks train the demo Llama-style model (FSDP2 + AdamW; model and optimizer state of
``--size-mb`` in total) and checkpoint ``{"train": Stateful(model, optim), "step": n}`` every
``--steps-per-save`` steps, in one fresh pair of processes per mode:

* ``no checkpoint``: the training steps alone (the step-time baseline);
* ``sync ucp`` / ``sync stock``: ``dcp.save`` with ``UCPWriter`` / ``FileSystemWriter``;
* ``async ucp``: ``torch_ucp.async_save`` (staging pool, dedicated gloo group);
* ``async ucp overlap``: the same with ``stage_before_step=optimizer``: the copy into the pool
  overlaps the next forward/backward and the optimizer step waits for it if needed;
* ``async ucp bounded``: the same with ``max_staging_bytes`` = ``--bounded-fraction`` of the
  state (the writer copies the rest while the caller waits);
* ``async stock``: ``dcp.async_save(storage_writer=FileSystemWriter, process_group=<gloo>)``.

Each mode first makes two saves back to back with no training running (the first checkpoint
of the process: it allocates torch_ucp's staging pool), sampling resident memory, then
``--saves`` saves during training. Columns (per rank medians, worst rank):

* ``save s``: call to committed checkpoint (synchronous: the call itself);
* ``blocked s``: how long the caller waits in the save call (taking ``state_dict()`` included),
  plus, with ``overlap``, the time optimizer steps waited for staging; ``1st save``: the same
  for the first checkpoint of the process;
* ``blocked/sync``: blocked time over the synchronous save of the same state with the same
  writer (``sync ucp`` for torch_ucp, ``sync stock`` for stock DCP);
* ``step s``, ``in save`` and ``slowdown``: training step time with no save running and while
  a background save runs, in the same run (steps of both kinds alternate, so load from other
  processes on the machine affects both alike); ``no checkpoint`` gives the plain step time;
* ``peak RSS``: the largest resident-memory increase during the two back-to-back saves over
  the memory before the first checkpoint (after ``malloc_trim``, so that memory training freed
  but the allocator kept does not hide a save's allocations), over this rank's state size
  (the staging pool stays resident between saves, so it counts).
"""

from __future__ import annotations

import argparse
import ctypes
import math
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_ucp import UCPSavePlanner, UCPWriter  # noqa: E402
from torch_ucp.asynchronous import AsyncSaver  # noqa: E402
from torch_ucp.demo.launch import run_distributed  # noqa: E402
from torch_ucp.demo.model import ModelConfig, build, train_step  # noqa: E402

MODES = ["no checkpoint", "sync ucp", "sync stock", "async ucp", "async ucp overlap",
         "async ucp bounded", "async stock"]
BYTES_PER_DIM2 = 12 * 2 * (4 + 3 * 11 / 4)  # fp32 param + 2 AdamW states, 2 layers, ffn = 2.75 d


def model_config(size_mb: float) -> ModelConfig:
    dim = max(64, round(math.sqrt(size_mb * 2**20 / BYTES_PER_DIM2) / 64) * 64)
    return ModelConfig(vocab_size=512, dim=dim, n_layers=2, n_heads=8, ffn_dim=dim * 11 // 4,
                       seq_len=16, batch=4)


class TrainState(Stateful):
    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError


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


def _local_state_bytes(model: torch.nn.Module, optim: torch.optim.Optimizer) -> int:
    model_sd, optim_sd = get_state_dict(model, optim)
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
        elif isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            total += t.numel() * t.element_size()

    walk(model_sd)
    walk(optim_sd)
    return total


class _Saving:
    """One save in ``mode``: ``start()`` returns after the caller is released."""

    def __init__(self, mode: str, saver: AsyncSaver, optim: torch.optim.Optimizer, group: Any):
        self.mode, self.saver, self.optim, self.group = mode, saver, optim, group

    def start(self, app: dict[str, Any], url: str) -> tuple[Any, Any]:
        """Returns ``(future of the committed save or None, torch_ucp handle or None)``."""
        mode = self.mode
        if mode == "sync ucp":
            dcp.save(app, storage_writer=UCPWriter(url), planner=UCPSavePlanner())
            return None, None
        if mode == "sync stock":
            dcp.save(app, storage_writer=dcp.FileSystemWriter(url))
            return None, None
        if mode.startswith("async ucp"):
            overlap = self.optim if mode == "async ucp overlap" else None
            handle = self.saver.save(app, url, stage_before_step=overlap)
            return handle.done(), handle
        if mode == "async stock":
            f = dcp.async_save(app, storage_writer=dcp.FileSystemWriter(url), process_group=self.group)
            return getattr(f, "upload_completion", f), None
        raise ValueError(mode)


def bench_rank(mode: str, base: str, size_mb: float, saves: int, steps_per_save: int,
               bounded_fraction: float) -> dict[str, Any]:
    """One mode on one rank; returns timings (seconds) and memory (bytes).

    Phase 1 (memory): two saves back to back with no training in between, sampling RSS; the
    first is the first checkpoint of the process (it allocates torch_ucp's staging pool).
    Phase 2 (training): ``saves`` saves, each followed by ``steps_per_save`` training steps.
    """
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = model_config(size_mb)
    model = build(cfg, mesh, "fsdp")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0
    for _ in range(2):  # warm up: optimizer state exists from here on
        train_step(model, optim, cfg, step)
        step += 1
    state_bytes = _local_state_bytes(model, optim)
    app = {"train": TrainState(model, optim), "step": step}
    group = dist.new_group(backend="gloo") if mode == "async stock" else None
    saver = AsyncSaver(max_staging_bytes=int(state_bytes * bounded_fraction)
                       if mode == "async ucp bounded" else None)
    saving = _Saving(mode, saver, optim, group)
    rank = dist.get_rank()
    out: dict[str, Any] = {"state_bytes": state_bytes, "blocked": [], "save": [], "steps": [],
                           "steps_during_save": [], "peak_rss_extra": 0, "blocked_first": None}

    def clean(url: str) -> None:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(url, ignore_errors=True)

    if mode != "no checkpoint":  # phase 1: checkpoint memory, nothing else running
        dist.barrier()
        _malloc_trim()
        rss0 = _rss()
        with PeakRSS() as peak:
            for i in range(2):
                url = os.path.join(base, f"memory-{i}")
                t0 = time.perf_counter()
                done, _ = saving.start(app, url)
                if i == 0:
                    out["blocked_first"] = time.perf_counter() - t0
                if done is not None:
                    done.result()
                clean(url)
        out["peak_rss_extra"] = peak.peak - rss0

    for i in range(saves):  # phase 2: saves during training
        url = os.path.join(base, f"save-{i}")
        app["step"] = step
        dist.barrier()
        t0 = time.perf_counter()
        done, handle = saving.start(app, url) if mode != "no checkpoint" else (None, None)
        blocked = time.perf_counter() - t0
        finished = [t0 + blocked]
        if done is not None:
            finished[0] = None
            done.add_done_callback(lambda _, box=finished: box.__setitem__(0, time.perf_counter()))
        for _ in range(steps_per_save):
            s0 = time.perf_counter()
            in_flight = done is not None and not done.done()
            train_step(model, optim, cfg, step)
            step += 1
            (out["steps_during_save"] if in_flight else out["steps"]).append(time.perf_counter() - s0)
        if done is not None:
            done.result()
        if handle is not None:
            st = handle.stats
            blocked += st.step_wait  # optimizer steps that waited for staging
            out.setdefault("breakdown", []).append(
                {"state_dict": st.state_dict, "staging": st.staging, "streaming": st.streaming,
                 "step_wait": st.step_wait, "background": st.background})
        if mode != "no checkpoint":
            out["blocked"].append(blocked)
            out["save"].append(finished[0] - t0)
        clean(url)
    saver.close()
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: worst rank of each per-rank median."""
    rows = []
    for mode, per_rank in results.items():
        def worst(key: str, per_rank: list = per_rank) -> float | None:
            vals = [_median(r[key]) for r in per_rank]
            vals = [v for v in vals if v is not None]
            return max(vals) if vals else None

        rows.append({
            "mode": mode,
            "save": worst("save"),
            "blocked_first": max((r["blocked_first"] for r in per_rank
                                  if r["blocked_first"] is not None), default=None),
            "blocked": worst("blocked"),
            "step": worst("steps"),
            "step_during_save": worst("steps_during_save"),
            "peak_rss_extra": max(r["peak_rss_extra"] for r in per_rank),
            "state_bytes": per_rank[0]["state_bytes"],
        })
    by = {r["mode"]: r for r in rows}
    for r in rows:
        r["peak_rss"] = r["peak_rss_extra"] / r["state_bytes"] if r["mode"] != "no checkpoint" else None
        sync = by.get("sync stock" if "stock" in r["mode"] else "sync ucp", {}).get("save")
        r["blocked_frac"] = r["blocked"] / sync if r["blocked"] is not None and sync else None
        during, between = r["step_during_save"], r["step"]
        r["slowdown"] = during / between - 1 if during and between else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: float | None, fmt: str, width: int, scale: float = 1.0, unit: str = "") -> str:
        return (format(v * scale, fmt) + unit if v is not None else "-").rjust(width)

    header = (f"{'mode':<19}{'save s':>8}{'blocked s':>11}{'1st save':>10}{'blocked/sync':>14}"
              f"{'step s':>8}{'in save':>9}{'slowdown':>10}{'peak RSS':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['mode']:<19}{cell(r['save'], '.3f', 8)}{cell(r['blocked'], '.4f', 11)}"
            f"{cell(r['blocked_first'], '.4f', 10)}{cell(r['blocked_frac'], '.1f', 14, 100, '%')}"
            f"{cell(r['step'], '.3f', 8)}{cell(r['step_during_save'], '.3f', 9)}"
            f"{cell(r['slowdown'], '+.0f', 10, 100, '%')}{cell(r['peak_rss'], '.2f', 10, 1, 'x')}"
        )
    return "\n".join(lines)


def run(size_mb: float, saves: int, steps_per_save: int, bounded_fraction: float, directory: str,
        modes: list[str] = MODES, world_size: int = 2) -> list[dict[str, Any]]:
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    results = {}
    try:
        for mode in modes:
            path = os.path.join(directory, mode.replace(" ", "-"))
            results[mode] = run_distributed(bench_rank, world_size, mode, path, size_mb, saves,
                                            steps_per_save, bounded_fraction)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return summarize(results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=300.0, help="model + optimizer state, all ranks")
    p.add_argument("--saves", type=int, default=6)
    p.add_argument("--steps-per-save", type=int, default=3)
    p.add_argument("--bounded-fraction", type=float, default=0.25)
    p.add_argument("--dir", default="/tmp/ucp-async-bench")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    cfg = model_config(args.size_mb)
    rows = run(args.size_mb, args.saves, args.steps_per_save, args.bounded_fraction, args.dir, modes)
    state = rows[0]["state_bytes"]
    print(f"state: {2 * state / 2**20:.0f} MiB model + AdamW over 2 ranks ({state / 2**20:.0f} MiB "
          f"per rank; dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.n_layers} layers), {args.saves} saves "
          f"every {args.steps_per_save} steps, {os.cpu_count()} cores\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
