"""pytest-benchmark cases for asynchronous save, at small sizes (not part of the ``tests/`` run).

    python -m pytest benchmarks/test_bench_async.py --benchmark-enable

In-process cases time what the caller is blocked for (``torch_ucp.async_save`` with its staging
pool, stock ``dcp.async_save``) against a synchronous ``dcp.save`` with ``UCPWriter`` on a
32 MiB state; the last case runs the 2-rank training-time-lost table of ``async_save_bench.py``
on a small model and attaches it to ``extra_info``.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from async_save_bench import MODES, format_table, run  # noqa: E402

from torch_ucp import UCPSavePlanner, UCPWriter, open_checkpoint  # noqa: E402
from torch_ucp.asynchronous import AsyncSaver  # noqa: E402

MiB = 2**20


@pytest.fixture(autouse=True)
def _quiet_no_dist():
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process"
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture
def state() -> dict:
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}": torch.randn(1024, 1024, generator=g) for i in range(8)}  # 32 MiB
    return {"model": tensors, "step": 7}


@pytest.fixture
def urls(tmp_path):
    counter = itertools.count()
    return lambda: str(tmp_path / f"ckpt-{next(counter)}")


def test_bench_sync_save_ucp(benchmark, state, urls):
    benchmark.pedantic(
        lambda: dcp.save(state, storage_writer=UCPWriter(urls()), planner=UCPSavePlanner(), no_dist=True),
        rounds=5,
        warmup_rounds=1,
    )


def test_bench_async_save_blocked_ucp(benchmark, state, urls):
    handles = []

    def setup():
        if handles:
            handles[-1].result()
        return (state, urls()), {}

    with AsyncSaver() as saver:
        benchmark.pedantic(lambda s, u: handles.append(saver.save(s, u)), setup=setup, rounds=5,
                           warmup_rounds=1)
        handles[-1].result()
        assert saver.pool.allocations == 1
    last = open_checkpoint(handles[-1].checkpoint_id)
    assert torch.equal(last.read("model.layer3"), state["model"]["layer3"])


def test_bench_async_save_blocked_stock(benchmark, state, urls):
    futures = []

    def setup():
        if futures:
            futures[-1].result()
        return (state, urls()), {}

    def save(s, url):
        f = dcp.async_save(s, storage_writer=dcp.FileSystemWriter(url), no_dist=True)
        futures.append(getattr(f, "upload_completion", f))

    benchmark.pedantic(save, setup=setup, rounds=5, warmup_rounds=1)
    futures[-1].result()


def test_bench_training_time_lost_small(benchmark, tmp_path):
    """The training-time-lost table of async_save_bench.py on a small MLP (2 ranks)."""
    steps = [1, 3]
    rows = benchmark.pedantic(
        lambda: run(layers=4, dim=256, batch=8, rounds=1, steps=steps, bounded_fraction=0.25,
                    directory=str(tmp_path / "loop")),
        rounds=1,
    )
    benchmark.extra_info["table"] = format_table(rows, steps)
    print("\n" + format_table(rows, steps))
    by = {r["mode"]: r for r in rows}
    assert set(by) == set(MODES)
    for mode in MODES:
        assert by[mode]["save"] > 0 and all(by[mode][f"lost{n}"] is not None for n in steps)
