"""Asynchronous save (issue 4): ``torch_ucp.async_save`` and ``dcp.async_save`` with UCPWriter.

A save started during FSDP2 + AdamW training holds exactly the state at the call, bit for bit,
although the optimizer keeps stepping while it is written (the background save is held back
until the training steps after the call have run, so a leak would show); the same with the
copy overlapping forward/backward (``stage_before_step``: the optimizer step waits for it) and
with bounded staging (the pool stays within its bound, the writer copies the rest). Saves run
one at a time; a failing save (storage error on all ranks or on one, an in-place change that
beat the copy on one rank) raises on ``result()`` on every rank and commits nothing; the
staging pool is allocated once and resident memory stays flat over repeated saves. Real gloo
processes, local disk and a real local S3 server.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import torch_ucp
from torch_ucp import (
    CheckpointNotFoundError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    open_checkpoint,
)
from torch_ucp.asynchronous import (
    AsyncSaver,
    StagingPool,
    StreamingPlanner,
    async_save,
    checkpoint_process_group,
    rebuild_dtensor,
)
from torch_ucp.asynchronous import (
    close as close_default_saver,
)
from torch_ucp.demo.launch import run_distributed
from torch_ucp.demo.model import ModelConfig, build, train_step

# -------------------------------------------------------------------------------- helpers


class TrainState(Stateful):
    """Model + optimizer as one Stateful entry, as in the DCP tutorials."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover - unused
        raise NotImplementedError


class GatedPlanner(UCPSavePlanner):
    """Holds the background save before any byte is written until ``gate`` is set."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def finish_plan(self, new_plan):
        assert self.gate.wait(120), "gate never opened"
        return super().finish_plan(new_plan)


class FailingWriter(UCPWriter):
    """Fails on ``victim`` after the other ranks have written their data."""

    def __init__(self, url: str, victim: int, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.victim = victim

    def write_data(self, plan, planner):
        if dist.get_rank() == self.victim:
            raise OSError(f"injected write failure on rank {self.victim}")
        return super().write_data(plan, planner)


class SlowPool(StagingPool):
    """A staging pool whose bulk copy starts ``delay`` seconds late (a large, slow state)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def copy(self, prepared):
        time.sleep(self.delay)
        return super().copy(prepared)


def _leaves(obj: Any, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Full values of a state (Stateful entries expanded): collectives for DTensors."""
    state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
    out = {}
    for path, v in _leaves(state):
        if isinstance(v, DTensor):
            out[path] = v.full_tensor().clone()
        elif isinstance(v, torch.Tensor):
            out[path] = v.detach().clone()
        else:
            out[path] = copy.deepcopy(v)
    return out


def _zeros_like(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _zeros_like(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_zeros_like(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj.detach())
    return None  # non-tensor values are replaced by the loaded ones


def _compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    problems = []
    if sorted(expected) != sorted(got):
        problems.append(f"keys differ: {sorted(set(expected) ^ set(got))}")
    for k, e in expected.items():
        g = got.get(k)
        if isinstance(e, torch.Tensor):
            if not isinstance(g, torch.Tensor) or g.dtype != e.dtype or not torch.equal(g, e):
                problems.append(f"{k}: differs")
        elif g != e:
            problems.append(f"{k}: {g!r} != {e!r}")
    return problems


def _load_and_compare(url: str, options: dict, like: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """dcp.load with UCPReader/UCPLoadPlanner into a zeroed copy of ``like`` on this layout."""
    like = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in like.items()}
    target = _zeros_like(like)
    dcp.load(target, storage_reader=UCPReader(url, **options), planner=UCPLoadPlanner())
    return _compare(expected, _snapshot(target))


def _fsdp_training(steps: int = 2):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = ModelConfig()
    model = build(cfg, mesh, "fsdp")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        train_step(model, optim, cfg, step)
    return cfg, model, optim


def _differs(snapshot: dict[str, Any], state: dict[str, Any]) -> bool:
    return bool(_compare(snapshot, _snapshot(state)))


# -------------------------------------------------------------------------------- rank functions


def _train_and_save(url: str, options: dict) -> dict[str, Any]:
    """Async saves in the middle of FSDP2 + AdamW training; later steps must not leak in."""
    cfg, model, optim = _fsdp_training(steps=2)
    out: dict[str, Any] = {}
    with AsyncSaver() as saver:
        # unbounded staging; the write is held back until two more steps have run
        state = {"train": TrainState(model, optim), "step": 2, "note": {"lr": [1e-2]}}
        expected = _snapshot(state)
        gate = threading.Event()
        handle = saver.save(state, f"{url}/full", planner=GatedPlanner(gate), **options)
        out["staged_on_return"] = handle.staged().done()
        for step in (2, 3):
            train_step(model, optim, cfg, step)
        state["step"], state["note"]["lr"][0] = 4, 0.5  # plain values change too
        out["pending_during_steps"] = not handle.done().done()
        gate.set()
        handle.result(timeout=120)
        out["live_changed"] = _differs(expected, state)
        out["full"] = _load_and_compare(f"{url}/full", options, state, expected)
        out["checkpoint_group_is_not_world"] = checkpoint_process_group() is not dist.group.WORLD

        # bounded staging: the pool holds a third of the state, the writer copies the rest
        state_bytes = sum(
            (v.to_local() if isinstance(v, DTensor) else v).nbytes
            for _, v in _leaves(TrainState(model, optim).state_dict())
            if isinstance(v, torch.Tensor)
        )
        bound = state_bytes // 3
        expected = _snapshot(state)
        handle = saver.save(state, f"{url}/bounded", max_staging_bytes=bound, **options)
        for step in (4, 5):
            train_step(model, optim, cfg, step)
        handle.result(timeout=120)
        out["bounded_live_changed"] = _differs(expected, state)
        out["bounded"] = _load_and_compare(f"{url}/bounded", options, state, expected)
        out["bounded_stats"] = {
            "pooled": handle.stats.pooled_bytes,
            "streamed": handle.stats.streamed_bytes,
            "capacity": saver.pool.capacity_bytes,
            "bound": bound,
        }
    return out


def _overlapped_staging(url: str) -> dict[str, Any]:
    """stage_before_step: the copy overlaps forward/backward, optimizer.step() waits for it;
    an in-place change that bypasses the optimizer (on one rank) fails the save everywhere."""
    cfg, model, optim = _fsdp_training(steps=2)
    out: dict[str, Any] = {}
    with AsyncSaver(pool=SlowPool(0.5)) as saver:
        state = {"train": TrainState(model, optim), "step": 2}
        expected = _snapshot(state)
        handle = saver.save(state, f"{url}/overlap", stage_before_step=optim)
        out["staged_on_return"] = handle.staged().done()
        out["blocked"] = handle.stats.blocked
        for step in (2, 3):
            train_step(model, optim, cfg, step)
        out["staged_after_steps"] = handle.staged().done()
        handle.result(timeout=120)
        out["step_wait"] = handle.stats.step_wait
        out["live_changed"] = _differs(expected, state)
        out["overlap"] = _load_and_compare(f"{url}/overlap", {}, state, expected)

        running = torch.zeros(16)  # e.g. statistics a forward pass updates in place
        state["running"] = running
        handle = saver.save(state, f"{url}/race", stage_before_step=optim)
        if dist.get_rank() == 1:
            running.add_(1.0)  # not through the optimizer: the guard cannot hold it back
        try:
            handle.result(timeout=120)
            out["race"] = None
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported to the test
            out["race"] = f"{type(e).__name__}: {e}"
        out["race_staged_error"] = repr(handle.staged().exception(timeout=1))
        out["race_committed"] = _committed(f"{url}/race")

        del state["running"]  # (now differs between ranks)
        expected = _snapshot(state)  # the saver still works
        handle = saver.save(state, f"{url}/after", stage_before_step=[optim])
        train_step(model, optim, cfg, 4)
        handle.result(timeout=120)
        out["after"] = _load_and_compare(f"{url}/after", {}, state, expected)
    return out


def _committed(url: str, **options: Any) -> bool | str:
    try:
        open_checkpoint(url, **options)
        return True
    except CheckpointNotFoundError:
        return False
    except Exception as e:  # noqa: BLE001 - e.g. the parent is a file
        return f"unreadable ({type(e).__name__})"


def _two_saves(base: str) -> dict[str, Any]:
    cfg, model, optim = _fsdp_training(steps=1)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    saver_logger = logging.getLogger("torch_ucp.asynchronous.saver")
    saver_logger.addHandler(handler)
    saver_logger.setLevel(logging.INFO)
    try:
        state = {"train": TrainState(model, optim), "step": 1}
        first_expected = _snapshot(state)
        gate = threading.Event()
        first = async_save(state, f"{base}/first", planner=GatedPlanner(gate))
        train_step(model, optim, cfg, 1)
        state["step"] = 2
        second_expected = _snapshot(state)
        threading.Timer(0.5, gate.set).start()  # the first save finishes after 0.5 s
        second = async_save(state, f"{base}/second")
        first_done_before_second_returned = first.done().done()
        train_step(model, optim, cfg, 2)
        second.result(timeout=120)
        first.result(timeout=120)
        close_default_saver()
    finally:
        saver_logger.removeHandler(handler)
    return {
        "first_done_before_second_returned": first_done_before_second_returned,
        "second_waited": second.stats.waited,
        "first_waited": first.stats.waited,
        "log": records,
        "first": _load_and_compare(f"{base}/first", {}, state, first_expected),
        "second": _load_and_compare(f"{base}/second", {}, state, second_expected),
    }


def _failing_saves(base: str, s3_options: dict) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    state = {"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None), "step": 3}
    out: dict[str, Any] = {}
    blocker = f"{base}/a-file"
    if dist.get_rank() == 0:
        with open(blocker, "w") as f:
            f.write("not a directory")
    dist.barrier()
    cases = {
        "parent-is-a-file": (f"{blocker}/ckpt", {}),
        "rank-1-fails": (FailingWriter(f"{base}/partial", victim=1), {}),
    }
    if s3_options:
        cases["no-such-bucket"] = ("s3://torch-ucp-no-such-bucket-4f2a/ckpt", s3_options)
    with AsyncSaver() as saver:
        for name, (target, options) in cases.items():
            t0 = time.perf_counter()
            handle = saver.save(state, target, **options)
            try:
                handle.result(timeout=120)
                out[name] = {"raised": None}
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported to the test
                out[name] = {"raised": f"{type(e).__name__}: {e}"}
            out[name]["seconds"] = time.perf_counter() - t0
            url = target if isinstance(target, str) else target.url
            out[name]["committed"] = _committed(url, **options)
        out["partial_data_written"] = any(
            n.startswith("data-") for n in os.listdir(f"{base}/partial")
        ) if os.path.isdir(f"{base}/partial") else False
        # the saver keeps working after failures
        handle = saver.save(state, f"{base}/good")
        handle.result(timeout=120)
        out["after"] = _load_and_compare(f"{base}/good", {}, state, _snapshot(state))
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _repeated_saves(base: str, saves: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    state = {
        f"layer{i}": distribute_tensor(torch.randn(512, 1024, generator=g), mesh, [Shard(i % 2)], src_data_rank=None)
        for i in range(8)
    }  # 16 MiB, 8 MiB per rank
    state["bias"] = distribute_tensor(torch.randn(1024, generator=g), mesh, [Replicate()], src_data_rank=None)
    state["meta"] = {"step": 0, "names": ["a", "b"]}
    rss, allocations, blocked = [], [], []
    with AsyncSaver() as saver:
        for i in range(saves + 1):  # the last save is checked against a snapshot, not measured
            state["meta"]["step"] = i
            expected = _snapshot(state) if i == saves else None
            handle = saver.save(state, UCPWriter(f"{base}/ckpt", overwrite=True))
            with torch.no_grad():
                for k in range(8):
                    state[f"layer{k}"].to_local().mul_(1.01)
            handle.result(timeout=120)
            if i < saves:
                rss.append(_rss())
                allocations.append(saver.pool.allocations)
                blocked.append(handle.stats.blocked)
        capacity = saver.pool.capacity_bytes
    local_bytes = sum(v.to_local().nbytes for k, v in state.items() if k != "meta")
    return {
        "allocations": allocations,
        "rss": rss,
        "capacity": capacity,
        "local_bytes": local_bytes,
        "last": _load_and_compare(f"{base}/ckpt", {}, state, expected),
        "blocked": blocked,
    }


def _dcp_async_save(base: str, mode: str, options: dict) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    cfg, model, optim = _fsdp_training(steps=2)
    state = {"train": TrainState(model, optim), "step": 2}
    expected = _snapshot(state)
    group = dist.new_group(backend="gloo")
    future = dcp.async_save(
        state,
        storage_writer=UCPWriter(f"{base}/{mode}", **options),
        planner=UCPSavePlanner(),
        process_group=group,
        async_checkpointer_type=getattr(AsyncCheckpointerType, mode),
    )
    for step in (2, 3):
        train_step(model, optim, cfg, step)
    future = getattr(future, "upload_completion", future)
    future.result(timeout=300)
    return {"problems": _load_and_compare(f"{base}/{mode}", options, state, expected)}


def _dtensor_rebuild() -> list[str]:
    """Staged DTensors keep mesh, placements, global shape and stride (both constructors)."""
    mesh = init_device_mesh("cpu", (2,))
    problems = []
    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        full = torch.arange(7 * 5, dtype=torch.float64).reshape(7, 5)  # uneven shards
        dt = distribute_tensor(full, mesh, placements, src_data_rank=None)
        staged = StagingPool().stage({"x": dt}).state_dict["x"]
        private = DTensor(dt.to_local().clone(), dt._spec, requires_grad=False)  # GPU branch
        for name, got in (("staged", staged), ("private", private), ("helper", rebuild_dtensor(dt.to_local().clone(), dt))):
            if (got.placements, got.shape, got.stride()) != (dt.placements, dt.shape, dt.stride()):
                problems.append(f"{placements} {name}: layout differs")
            if not torch.equal(got.full_tensor(), full):
                problems.append(f"{placements} {name}: values differ")
            if got.to_local().data_ptr() == dt.to_local().data_ptr():
                problems.append(f"{placements} {name}: not a copy")
    return problems


# -------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("where", ["local", "s3"])
def test_async_save_during_fsdp2_training_is_bit_exact(where, tmp_path, request):
    if where == "s3":
        url, options = request.getfixturevalue("s3_bucket")
    else:
        url, options = str(tmp_path), {}
    results = run_distributed(_train_and_save, 2, url, options)
    for rank, r in enumerate(results):
        assert r["staged_on_return"], rank
        assert r["pending_during_steps"], f"rank {rank}: save finished before the steps ran"
        assert r["live_changed"] and r["bounded_live_changed"], "training did not change the state"
        assert r["full"] == [], f"rank {rank}: {r['full']}"
        assert r["bounded"] == [], f"rank {rank}: {r['bounded']}"
        assert r["checkpoint_group_is_not_world"]
        b = r["bounded_stats"]
        assert b["streamed"] > 0 and b["pooled"] > 0, b
        assert b["capacity"] <= b["bound"], b


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory):
    return run_distributed(_overlapped_staging, 2, str(tmp_path_factory.mktemp("overlap")))


def test_stage_before_step_overlaps_the_copy_and_guards_the_optimizer(overlapped):
    for rank, r in enumerate(overlapped):
        assert r["overlap"] == [], (rank, r["overlap"])
        assert not r["staged_on_return"], "the copy should still be running (0.5 s delay)"
        assert r["blocked"] < 0.4, r["blocked"]
        assert r["staged_after_steps"]
        assert r["step_wait"] > 0.1, f"optimizer.step() did not wait: {r['step_wait']}"
        assert r["live_changed"]
        assert r["after"] == [], (rank, r["after"])


def test_in_place_change_before_staging_fails_the_save_on_every_rank(overlapped):
    for rank, r in enumerate(overlapped):
        assert r["race"] and "modified in place" in r["race"], (rank, r["race"])
        assert r["race_committed"] is False
    assert "StagingRaceError" in overlapped[1]["race_staged_error"]


def test_second_save_waits_for_the_first(tmp_path):
    results = run_distributed(_two_saves, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["first"] == [] and r["second"] == [], (rank, r["first"], r["second"])
        assert r["first_waited"] == 0.0
        assert r["second_waited"] > 0.2, r["second_waited"]
        assert r["first_done_before_second_returned"]
        assert any("waits for the previous save" in m for m in r["log"]), r["log"]
        assert any(m.startswith("torch_ucp: waited") for m in r["log"]), r["log"]


def test_failed_save_raises_on_result_and_commits_nothing(tmp_path, s3_server):
    results = run_distributed(_failing_saves, 2, str(tmp_path), s3_server.storage_options())
    for rank, r in enumerate(results):
        for case in ("parent-is-a-file", "rank-1-fails", "no-such-bucket"):
            assert r[case]["raised"], f"rank {rank} {case}: no error"
            assert r[case]["committed"] is not True, f"rank {rank} {case}: committed"
        assert r["rank-1-fails"]["committed"] is False
        assert "injected write failure" in r["rank-1-fails"]["raised"]
        assert r["after"] == []
    assert results[0]["partial_data_written"], "rank 0 should have written (uncommitted) data"


def test_staging_pool_is_allocated_once_and_rss_stays_flat(tmp_path):
    saves = 10
    results = run_distributed(_repeated_saves, 2, str(tmp_path), saves)
    for rank, r in enumerate(results):
        assert r["last"] == [], (rank, r["last"])
        assert r["allocations"] == [1] * saves, r["allocations"]
        assert r["local_bytes"] <= r["capacity"] < r["local_bytes"] + 64 * 20
        growth = r["rss"][-1] - r["rss"][1]
        assert growth < max(8 << 20, r["local_bytes"] // 4), (
            f"rank {rank}: RSS grew {growth / 2**20:.1f} MiB over {saves - 2} saves of "
            f"{r['local_bytes'] / 2**20:.1f} MiB: {[x >> 20 for x in r['rss']]}"
        )


@pytest.mark.parametrize("mode", ["THREAD", "PROCESS"])
def test_dcp_async_save_with_ucp_writer(mode, tmp_path):
    from torch.distributed.checkpoint import state_dict_saver

    if not hasattr(getattr(state_dict_saver, "AsyncCheckpointerType", None), mode):
        pytest.skip(f"AsyncCheckpointerType.{mode} is not in torch {torch.__version__}")
    results = run_distributed(_dcp_async_save, 2, str(tmp_path), mode, {})
    for rank, r in enumerate(results):
        assert r["problems"] == [], (rank, r["problems"])


def test_staged_dtensors_keep_their_layout():
    problems = run_distributed(_dtensor_rebuild, 2)
    assert problems == [[], []]


# -------------------------------------------------------------------------------- in-process


def test_writer_and_planner_are_picklable_for_process_mode(s3_bucket):
    url, options = s3_bucket
    writer = UCPWriter(f"{url}/ckpt", overwrite=True, **options)
    writer.store.fs  # an opened filesystem must not be pickled  # noqa: B018
    clone = pickle.loads(pickle.dumps(writer))
    assert (clone.url, clone.overwrite, clone.storage_options) == (writer.url, True, options)
    planner = pickle.loads(pickle.dumps(UCPSavePlanner()))
    assert isinstance(planner, UCPSavePlanner)


def test_single_process_async_save_and_staging_structure(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "a": torch.randn(33, 7),
        "nested": {"ids": torch.arange(5), "mask": torch.tensor([True, False]), "same": shared},
        "alias": shared,  # one tensor under two names is staged once
        "list": [torch.ones(2, dtype=torch.bfloat16), "x", 3],
        "tuple": (1, torch.zeros(0)),
        "value": {"lr": 0.5},
        "transposed": torch.randn(5, 3).t(),  # non-contiguous source
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    pool = StagingPool()
    staged = pool.stage(state)
    sd = staged.state_dict
    assert sd["nested"]["same"] is sd["alias"]
    assert sd["value"] == state["value"] and sd["value"] is not state["value"]
    assert torch.equal(sd["a"], state["a"]) and sd["a"].data_ptr() != state["a"].data_ptr()
    assert sd["list"][0].dtype == torch.bfloat16 and sd["tuple"][1].shape == (0,)
    for key in ("transposed", "scalar"):
        assert torch.equal(sd[key], state[key]) and sd[key].dtype == state[key].dtype
    assert all(
        t.data_ptr() % 64 == 0 for _, t in _leaves(sd) if isinstance(t, torch.Tensor) and t.numel()
    )
    assert pool.allocations == 1 and staged.allocated
    again = pool.stage(state)
    assert pool.allocations == 1 and not again.allocated
    pool.close()
    assert pool.capacity_bytes == 0

    expected = _snapshot(state)
    with AsyncSaver() as saver:
        handle = saver.save(state, str(tmp_path / "ckpt"))
        state["a"].add_(1.0)  # after the call: must not reach the checkpoint
        handle.result(timeout=60)
    ckpt = open_checkpoint(str(tmp_path / "ckpt"))
    assert torch.equal(ckpt.read("a"), expected["a"])
    assert ckpt.read("value.lr") == 0.5 and ckpt.read("list.1") == "x"
    assert torch.equal(ckpt.read("list.0"), torch.ones(2, dtype=torch.bfloat16))


def test_bounded_pool_streams_the_head_and_never_exceeds_the_bound(tmp_path):
    state = {f"t{i}": torch.randn(256, 256) for i in range(6)}  # 6 x 256 KiB
    bound = 2 * 256 * 1024 + 64
    pool = StagingPool()
    staged = pool.stage(state, max_bytes=bound)
    assert pool.capacity_bytes <= bound
    assert staged.pooled_bytes == 2 * 256 * 1024 and staged.streamed_bytes == 4 * 256 * 1024
    assert staged.state_dict["t0"] is state["t0"]  # head streamed (live)
    assert staged.state_dict["t5"] is not state["t5"]  # tail staged
    expected = {k: v.clone() for k, v in state.items()}
    with AsyncSaver(max_staging_bytes=bound) as saver:
        for i in range(3):
            handle = saver.save(state, str(tmp_path / f"c{i}"))
            for v in state.values():
                v.add_(1.0)
            handle.result(timeout=60)
            ckpt = open_checkpoint(str(tmp_path / f"c{i}"))
            for k, v in expected.items():
                assert torch.equal(ckpt.read(k), v), (i, k)
            expected = {k: v.clone() for k, v in state.items()}
            assert handle.stats.streamed_bytes == 4 * 256 * 1024
        assert saver.pool.allocations == 1 and saver.pool.capacity_bytes <= bound


def test_max_staging_bytes_knob_bounds_the_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_UCP_MAX_STAGING_BYTES", str(300 * 1024))
    state = {f"t{i}": torch.randn(256, 256) for i in range(4)}  # 4 x 256 KiB
    with AsyncSaver() as saver:
        handle = saver.save(state, str(tmp_path / "ckpt"))
        handle.result(timeout=60)
        assert saver.pool.capacity_bytes <= 300 * 1024
    assert handle.stats.pooled_bytes == 256 * 1024 and handle.stats.streamed_bytes == 3 * 256 * 1024
    ckpt = open_checkpoint(str(tmp_path / "ckpt"))
    assert all(torch.equal(ckpt.read(k), v) for k, v in state.items())


def test_streamed_fragment_asked_again_after_release_fails_the_save():
    t = torch.ones(4)
    prepared = StagingPool().prepare({"t": t}, max_bytes=1)
    (leaf,) = prepared.leaves
    assert not leaf.pooled
    planner = StreamingPlanner.around(UCPSavePlanner(), {id(t): leaf})
    planner.set_up_planner({"t": t}, None, True)
    plan = planner.create_local_plan()
    plan = planner.finish_plan(plan)
    (item,) = plan.items
    copy_ = planner.resolve_data(item)
    assert planner.released.is_set() and planner.all_copied
    assert torch.equal(copy_, t) and copy_.data_ptr() != t.data_ptr()
    with pytest.raises(torch_ucp.CheckpointError, match="asked again"):
        planner.resolve_data(item)


def test_writer_object_with_storage_options_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="storage options"):
        AsyncSaver().save({"x": torch.ones(1)}, UCPWriter(str(tmp_path)), endpoint_url="http://x")


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: pinned staging arena and non-blocking D2H copies on a side stream",
)
def test_cuda_staging_uses_pinned_arena_and_side_stream():  # pragma: no cover - needs CUDA
    dev = torch.device("cuda")
    state = {"w": torch.randn(1024, 1024, device=dev), "b": torch.randn(7, device=dev), "n": 3}
    pool = StagingPool()
    assert pool.pin_memory
    for _ in range(3):
        state["w"].mul_(1.5)  # queued on the current stream: staging must be ordered after it
        staged = pool.stage(state).state_dict
        assert staged["w"].device.type == "cpu" and staged["w"].is_pinned()
        assert torch.equal(staged["w"], state["w"].cpu()) and torch.equal(staged["b"], state["b"].cpu())
    assert pool.allocations == 1
    pool.close()
