"""Asynchronous save during a CPU training loop: what the caller pays, and what training pays.

    python benchmarks/async_save_bench.py [--size-mb 300] [--saves 4] [--steps-per-save 3]
                                          [--bounded-fraction 0.25] [--dir /tmp/ucp-async-bench]

Two gloo ranks train the demo Llama-style model (FSDP2 + AdamW; model and optimizer state of
``--size-mb`` in total) and checkpoint ``{"train": Stateful(model, optim), "step": n}`` every
``--steps-per-save`` steps, in one fresh pair of processes per mode:

* ``no checkpoint``: the training steps alone (the step-time baseline);
* ``sync ucp`` / ``sync stock``: ``dcp.save`` with ``UCPWriter`` / ``FileSystemWriter``;
* ``async ucp``: ``torch_ucp.async_save`` (staging pool, dedicated gloo group);
* ``async ucp bounded``: the same with ``max_staging_bytes`` = ``--bounded-fraction`` of the
  state (the writer copies the rest while the caller waits);
* ``async stock``: ``dcp.async_save(storage_writer=FileSystemWriter, process_group=<gloo>)``.

Columns (medians over the saves after the first; the first save is shown apart because it
allocates the staging pool; per rank, worst rank):

* ``save s``: call to committed checkpoint (synchronous: the call itself);
* ``blocked s``: how long the caller waits in the save call (taking ``state_dict()`` included);
* ``blocked/sync``: blocked time over the synchronous save of the same state with the same
  writer (``sync ucp`` for torch_ucp, ``sync stock`` for stock DCP);
* ``step s`` and ``slowdown``: training step time while a background save runs, against the
  ``no checkpoint`` baseline;
* ``peak RSS``: the largest resident-memory increase over the pre-checkpoint baseline during
  the saves, over this rank's state size.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_ucp import UCPSavePlanner, UCPWriter  # noqa: E402
from torch_ucp.async_save import AsyncSaver  # noqa: E402
from torch_ucp.demo.launch import run_distributed  # noqa: E402
from torch_ucp.demo.model import ModelConfig, build, train_step  # noqa: E402

MODES = ["no checkpoint", "sync ucp", "sync stock", "async ucp", "async ucp bounded", "async stock"]
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


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


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


def bench_rank(mode: str, base: str, size_mb: float, saves: int, steps_per_save: int,
               bounded_fraction: float) -> dict[str, Any]:
    """One mode on one rank; returns timings (seconds) and memory (bytes)."""
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
    rank = dist.get_rank()
    dist.barrier()
    baseline_rss = _rss()
    out: dict[str, Any] = {"state_bytes": state_bytes, "blocked": [], "save": [], "steps": [],
                           "steps_during_save": []}
    with PeakRSS() as peak:
        for i in range(saves):
            url = os.path.join(base, f"save-{i}")
            app["step"] = step
            dist.barrier()
            t0 = time.perf_counter()
            handle = None
            if mode == "sync ucp":
                dcp.save(app, storage_writer=UCPWriter(url), planner=UCPSavePlanner())
            elif mode == "sync stock":
                dcp.save(app, storage_writer=dcp.FileSystemWriter(url))
            elif mode.startswith("async ucp"):
                handle = saver.save(app, url)
                done = handle.done()
            elif mode == "async stock":
                done = dcp.async_save(app, storage_writer=dcp.FileSystemWriter(url),
                                      process_group=group)
                done = getattr(done, "upload_completion", done)
            blocked = time.perf_counter() - t0
            finished = [None if mode != "no checkpoint" and "async" in mode else t0 + blocked]
            if "async" in mode:
                done.add_done_callback(lambda _, box=finished: box.__setitem__(0, time.perf_counter()))
            for _ in range(steps_per_save):
                s0 = time.perf_counter()
                in_flight = "async" in mode and not done.done()
                train_step(model, optim, cfg, step)
                step += 1
                (out["steps_during_save"] if in_flight else out["steps"]).append(time.perf_counter() - s0)
            if "async" in mode:
                done.result()
            if handle is not None:
                st = handle.stats
                out.setdefault("breakdown", []).append(
                    {"state_dict": st.state_dict, "staging": st.staging, "streaming": st.streaming,
                     "waited": st.waited, "background": st.background})
            if mode != "no checkpoint":
                out["blocked"].append(blocked)
                out["save"].append(finished[0] - t0)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(url, ignore_errors=True)
    saver.close()
    out["peak_rss_extra"] = peak.peak - baseline_rss
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: worst rank of each per-rank median."""
    rows = []
    for mode, per_rank in results.items():
        def worst(key: str, skip_first: bool = True) -> float | None:
            vals = [_median(r[key][1:] if skip_first and len(r[key]) > 1 else r[key]) for r in per_rank]
            vals = [v for v in vals if v is not None]
            return max(vals) if vals else None

        rows.append({
            "mode": mode,
            "save": worst("save"),
            "blocked_first": max((r["blocked"][0] for r in per_rank if r["blocked"]), default=None),
            "blocked": worst("blocked"),
            "step": worst("steps", skip_first=False),
            "step_during_save": worst("steps_during_save", skip_first=False),
            "peak_rss": max(r["peak_rss_extra"] / r["state_bytes"] for r in per_rank),
            "state_bytes": per_rank[0]["state_bytes"],
        })
    by = {r["mode"]: r for r in rows}
    base_step = by.get("no checkpoint", {}).get("step")
    for r in rows:
        sync = by.get("sync stock" if "stock" in r["mode"] else "sync ucp", {}).get("save")
        r["blocked_frac"] = r["blocked"] / sync if r["blocked"] is not None and sync else None
        during = r["step_during_save"]
        r["slowdown"] = during / base_step - 1 if during and base_step else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    lines = [
        f"{'mode':<19} {'save s':>7} {'blocked s':>10} {'(1st save)':>10} {'blocked/sync':>12} "
        f"{'step s':>7} {'step s in save':>14} {'slowdown':>8} {'peak RSS':>9}",
        "-" * 104,
    ]
    for r in rows:
        lines.append(
            f"{r['mode']:<19} {f(r['save'], '7.3f')} {f(r['blocked'], '10.4f')} "
            f"{f(r['blocked_first'], '10.4f')} "
            f"{f(r['blocked_frac'] * 100 if r['blocked_frac'] is not None else None, '11.1f')}% "
            f"{f(r['step'], '7.3f')} {f(r['step_during_save'], '14.3f')} "
            f"{f(r['slowdown'] * 100 if r['slowdown'] is not None else None, '7.0f')}% "
            f"{r['peak_rss']:>8.2f}x"
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
    p.add_argument("--saves", type=int, default=4)
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
