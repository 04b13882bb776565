"""Read volume: a resharded load reads about the bytes each rank needs, not whole fragments.

Saved Shard(0) over 4 ranks, loaded Shard(1) over 2: every rank needs half of every saved row,
i.e. half of each fragment in 2 KiB runs. Bytes are counted in the reader itself. The default
``verify=True`` verifies every byte it delivers and still reads no more than that: checksum blocks
are 2 KiB of 32 rows, so a row half is whole blocks.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter
from torch_ucp.demo.launch import run_distributed

SHAPE = (1024, 1024)  # float32: 4 MiB, 4 checksum blocks per saved fragment


def _full() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _save(path: str) -> None:
    mesh = init_device_mesh("cpu", (4,))
    t = distribute_tensor(_full(), mesh, [Shard(0)], src_data_rank=None)
    dcp.save({"w": t}, storage_writer=UCPWriter(path), planner=UCPSavePlanner())


def _load(path: str, verify) -> dict:
    mesh = init_device_mesh("cpu", (2,))
    t = distribute_tensor(torch.zeros(SHAPE), mesh, [Shard(1)], src_data_rank=None)
    reader = UCPReader(path, verify=verify)
    dcp.load({"w": t}, storage_reader=reader, planner=UCPLoadPlanner())
    return {
        "equal": bool(torch.equal(t.full_tensor(), _full())),
        "local_bytes": t.to_local().numel() * 4,
        "read": reader.stats.bytes_read,
        "needed": reader.stats.bytes_needed,
        "requests": reader.stats.requests,
        "verified": reader.stats.bytes_verified,
    }


def test_resharded_load_reads_at_most_1_1x_needed(tmp_path):
    path = str(tmp_path / "ckpt")
    run_distributed(_save, 4, path)
    for r in run_distributed(_load, 2, path, True):
        assert r["equal"]
        assert r["needed"] == r["local_bytes"] == SHAPE[0] * SHAPE[1] * 4 // 2
        assert r["read"] <= 1.1 * r["needed"], r
        assert r["verified"] >= r["needed"], r  # every delivered byte was verified
    for r in run_distributed(_load, 2, path, False):
        assert r["equal"]
        assert r["read"] <= 1.1 * r["needed"] and r["verified"] == 0, r
