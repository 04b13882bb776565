"""pytest-benchmark cases: one process, 128 MiB, torch_ucp against stock DCP.

    python -m pytest benchmarks/test_bench_core.py --benchmark-enable

Not part of the test suite (``testpaths = tests``); ``benchmarks/compare.py`` is the
multi-process comparison that prints one table.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter, knobs, open_checkpoint
from torch_ucp.metadata.checksums import DEFAULT_ALGORITHM, BlockGrid

STATE = {f"layer{i}.weight": torch.randn(2048, 2048) for i in range(8)}  # 128 MiB


def _save_ucp(path):
    shutil.rmtree(path, ignore_errors=True)
    dcp.save(STATE, storage_writer=UCPWriter(path), planner=UCPSavePlanner(), no_dist=True)


def _save_stock(path):
    shutil.rmtree(path, ignore_errors=True)
    dcp.save(STATE, checkpoint_id=path, no_dist=True)


@pytest.mark.parametrize("system", ["torch_ucp", "dcp"])
def test_save(benchmark, tmp_path, system):
    path = str(tmp_path / "ckpt")
    benchmark.pedantic(_save_ucp if system == "torch_ucp" else _save_stock, args=(path,), rounds=3)


@pytest.mark.parametrize("system", ["torch_ucp", "torch_ucp-noverify", "dcp"])
def test_load_same_layout(benchmark, tmp_path, system):
    """``torch_ucp`` verifies every byte (the default), ``-noverify`` is ``verify=False``."""
    path = str(tmp_path / "ckpt")
    ucp = system.startswith("torch_ucp")
    (_save_ucp if ucp else _save_stock)(path)
    target = {k: torch.empty_like(v) for k, v in STATE.items()}

    def load():
        if ucp:
            reader = UCPReader(path, verify=system == "torch_ucp")
            dcp.load(target, storage_reader=reader, planner=UCPLoadPlanner(), no_dist=True)
        else:
            dcp.load(target, checkpoint_id=path, no_dist=True)

    benchmark.pedantic(load, rounds=3)
    assert all(torch.equal(target[k], v) for k, v in STATE.items())


@pytest.mark.parametrize("verify", [True, False])
def test_sliced_read_column_block(benchmark, tmp_path, verify):
    """A column block of every tensor: the reshard read pattern (half of every row)."""
    path = str(tmp_path / "ckpt")
    _save_ucp(path)
    ckpt = open_checkpoint(path, verify=verify)

    def read():
        return [ckpt.read(k, (slice(None), slice(0, 1024))) for k in STATE]

    out = benchmark.pedantic(read, rounds=3)
    assert torch.equal(out[0], STATE["layer0.weight"][:, :1024])


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_checksum_throughput(benchmark, layout):
    """Block checksums of 64 MiB as the writer computes them and a whole-fragment read verifies
    them (default algorithm and blocks): ``rows``, a [4096, 4096] float32 fragment (2 KiB x 32-row
    blocks); ``flat``, 1-D data or a value. ``extra_info["GB/s"]`` when timed (``--benchmark-enable``)."""
    data = memoryview(torch.randint(0, 256, (64 << 20,), dtype=torch.uint8).numpy())
    shape, itemsize = ((4096, 4096), 4) if layout == "rows" else ((64 << 20,), 1)
    grid = BlockGrid.for_fragment(shape, itemsize, knobs.checksum_block_bytes(), knobs.checksum_block_width())
    sums = benchmark.pedantic(grid.checksums, args=(data, DEFAULT_ALGORITHM), rounds=5, warmup_rounds=1)
    assert len(sums) == grid.count
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["algorithm"] = DEFAULT_ALGORITHM
        benchmark.extra_info["GB/s"] = round(len(data) / benchmark.stats.stats.min / 1e9, 2)
