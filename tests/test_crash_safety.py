"""Crash safety: SIGKILL one rank at several points of a save.

Afterwards the URL holds either the previous checkpoint, loadable bit-exactly, or nothing -
never a partial one - and a later save to the same URL succeeds and removes the leftovers.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torch_ucp import CheckpointNotFoundError, UCPSavePlanner, UCPWriter, open_checkpoint
from torch_ucp.demo.launch import RankFailedError, run_distributed

SHAPE = (96, 1024)  # 384 KiB per version; several items per rank


def _full(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {f"w{i}": torch.randn(SHAPE, generator=g) for i in range(4)}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _CrashingWriter(UCPWriter):
    """Kills its own process at ``point`` on ``victim`` (a real crash: no cleanup runs)."""

    def __init__(self, url: str, point: str, victim: int, **kwargs):
        super().__init__(url, overwrite=True, threads=1, **kwargs)
        self.point, self.victim = point, victim

    def _crash_here(self, point: str) -> bool:
        return self.point == point and dist.get_rank() == self.victim

    def _write_object(self, rel, items, planner):
        if self._crash_here("during-write"):
            half = items[: max(1, len(items) // 2)]
            super()._write_object(rel, half, planner)  # some bytes reach the disk
            _die()
        return super()._write_object(rel, items, planner)

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        if self._crash_here("after-write"):
            _die()
        return fut

    def finish(self, metadata, results):
        if self._crash_here("before-commit"):
            _die()
        super().finish(metadata, results)


def _save(url: str, version: int, point: str | None, victim: int) -> None:
    mesh = init_device_mesh("cpu", (2,))
    state = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in _full(version).items()}
    writer = _CrashingWriter(url, point, victim) if point else UCPWriter(url, overwrite=True)
    dcp.save(state, storage_writer=writer, planner=UCPSavePlanner())


def _assert_holds(url: str, version: int | None) -> None:
    if version is None:
        with pytest.raises(CheckpointNotFoundError):
            open_checkpoint(url)
        return
    ckpt = open_checkpoint(url, verify=True)
    for key, expected in _full(version).items():
        assert torch.equal(ckpt.read(key), expected), key


def _leftovers(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n != ".metadata")


@pytest.mark.parametrize(
    "point,victim",
    [("during-write", 1), ("after-write", 1), ("before-commit", 0)],
)
def test_crash_keeps_previous_checkpoint(tmp_path, point, victim):
    url = str(tmp_path / "step")
    run_distributed(_save, 2, url, 1, None, 0)
    with pytest.raises(RankFailedError):
        run_distributed(_save, 2, url, 2, point, victim)
    _assert_holds(url, 1)  # the interrupted overwrite left version 1 intact
    assert len(_leftovers(url)) == 2  # version 1's data and the abandoned save's
    run_distributed(_save, 2, url, 3, None, 0)
    _assert_holds(url, 3)
    assert len(_leftovers(url)) == 1  # the abandoned save's data is gone


def test_crash_of_first_save_leaves_nothing(tmp_path):
    url = str(tmp_path / "step")
    with pytest.raises(RankFailedError):
        run_distributed(_save, 2, url, 1, "before-commit", 0)
    _assert_holds(url, None)
    run_distributed(_save, 2, url, 2, None, 0)
    _assert_holds(url, 2)
    assert len(_leftovers(url)) == 1


def test_crash_on_s3_keeps_previous_checkpoint(s3_bucket):
    url, options = s3_bucket
    url = f"{url}/step"
    run_distributed(_save_s3, 2, url, options, 1, None, 0)
    with pytest.raises(RankFailedError):
        run_distributed(_save_s3, 2, url, options, 2, "during-write", 1)
    ckpt = open_checkpoint(url, verify=True, **options)
    for key, expected in _full(1).items():
        assert torch.equal(ckpt.read(key), expected), key
    run_distributed(_save_s3, 2, url, options, 3, None, 0)
    ckpt = open_checkpoint(url, **options)
    for key, expected in _full(3).items():
        assert torch.equal(ckpt.read(key), expected), key
    names = [n for n in ckpt.store.list_dir("") if n.startswith("data-")]
    assert names == [f"data-{ckpt.metadata.save_id}"]


def _save_s3(url: str, options: dict, version: int, point: str | None, victim: int) -> None:
    mesh = init_device_mesh("cpu", (2,))
    state = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in _full(version).items()}
    writer = (
        _CrashingWriter(url, point, victim, **options) if point else UCPWriter(url, overwrite=True, **options)
    )
    dcp.save(state, storage_writer=writer, planner=UCPSavePlanner())
