"""torch_ucp's errors are catchable by type through ``torch_ucp.save`` / ``torch_ucp.load``.

DCP wraps every rank's failure in ``CheckpointException``, a ``BaseException`` that
``except torch_ucp.CheckpointError`` never matches. On 2 real gloo ranks, each error torch_ucp
raises while saving or loading must arrive as itself on every rank, with DCP's exception
chained as its cause; ``torch_ucp.rank_error`` gets it out of a ``CheckpointException`` raised
by ``dcp`` directly.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import torch_ucp
from torch_ucp.demo.launch import run_distributed
from torch_ucp.patterns import Rename

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]


def _state(fill: float | None = None) -> dict:
    t = torch.arange(64.0).reshape(16, 4) if fill is None else torch.full((16, 4), fill)
    return {"model": {"w": t}, "step": 3}


def _largest_data_object(url: str) -> str:
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(url)
        for name in names
        if not name.startswith(".")
    ]
    return max(files, key=os.path.getsize)


def _caught(fn) -> dict:
    """What ``fn`` raised: the type, whether ``except torch_ucp.<type>`` and ``except
    Exception`` matched it, and the chained cause."""
    try:
        fn()
    except torch_ucp.CheckpointError as e:
        return {
            "type": type(e).__name__,
            "is_exception": isinstance(e, Exception),
            "cause": type(e.__cause__).__name__,
            "message": str(e),
        }
    except BaseException as e:  # noqa: BLE001 - reported to the test
        return {"type": type(e).__name__, "message": traceback.format_exc()}
    return {"type": None}


def _error_cases(base: str) -> dict:
    url = f"{base}/ckpt"
    rank = dist.get_rank()
    out = {}
    torch_ucp.save(_state(), url)
    out["exists"] = _caught(lambda: torch_ucp.save(_state(), url))
    out["not_found"] = _caught(lambda: torch_ucp.load(_state(0.0), f"{base}/nothing-here"))
    target = _state(0.0)
    target["model"]["extra"] = torch.zeros(2)
    out["load_plan"] = _caught(lambda: torch_ucp.load(target, url))

    corrupt = f"{base}/corrupt"
    torch_ucp.save(_state(), corrupt)
    dist.barrier()
    if rank == 0:
        path = _largest_data_object(corrupt)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    out["corrupt"] = _caught(lambda: torch_ucp.load(_state(0.0), corrupt))

    unsupported = f"{base}/unsupported"
    torch_ucp.save(_state(), unsupported)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(unsupported, ".metadata"), "wb") as f:
            f.write(b"not a checkpoint")
    dist.barrier()
    out["unsupported"] = _caught(lambda: torch_ucp.load(_state(0.0), unsupported))

    # dcp called directly: rank_error takes the torch_ucp error out of CheckpointException
    try:
        dcp.save(_state(), storage_writer=torch_ucp.UCPWriter(url), planner=torch_ucp.UCPSavePlanner())
    except CheckpointException as e:
        error = torch_ucp.rank_error(e)
        out["dcp_direct"] = type(error).__name__ if error is not None else None
    # and a good load still works after all that
    state = _state(0.0)
    torch_ucp.load(state, url)
    out["loaded"] = torch.equal(state["model"]["w"], _state()["model"]["w"]) and state["step"] == 3
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[dict]:
    return run_distributed(_error_cases, 2, str(tmp_path_factory.mktemp("errors")))


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("exists", "CheckpointExistsError", ["already holds a committed checkpoint", "overwrite=True"]),
        ("not_found", "CheckpointNotFoundError", ["no committed checkpoint at", "nothing-here"]),
        ("load_plan", "LoadPlanError", ["missing from", "model.extra"]),
        ("corrupt", "CorruptCheckpointError", ["checksum mismatch", "model.w"]),
        ("unsupported", "UnsupportedFormatError", ["unsupported/.metadata"]),
    ],
)
def test_error_is_caught_as_itself_on_every_rank(cases, case, error, words):
    for rank, result in enumerate(cases):
        got = result[case]
        assert got["type"] == error, f"rank {rank}: {got}"
        assert got["is_exception"], "catchable with except Exception"
        assert got["cause"] == "CheckpointException", "DCP's exception is chained"
        for word in words:
            assert word in got["message"], (rank, got["message"])


def test_rank_error_unwraps_dcp_directly(cases):
    assert [r["dcp_direct"] for r in cases] == ["CheckpointExistsError"] * 2
    assert all(r["loaded"] for r in cases)


def test_rank_error_prefers_torch_ucp_errors_then_the_lowest_rank():
    def wrapped(e: BaseException):
        try:
            raise e
        except BaseException as raised:  # noqa: BLE001
            return (raised, traceback.extract_tb(raised.__traceback__))

    corrupt = torch_ucp.CorruptCheckpointError("bad block")
    other = RuntimeError("peer went away")
    e = CheckpointException("read", {0: wrapped(other), 1: wrapped(corrupt)})
    assert torch_ucp.rank_error(e) is corrupt
    second = ValueError("second")
    assert torch_ucp.rank_error(CheckpointException("x", {3: wrapped(second), 1: wrapped(other)})) is other
    nested = CheckpointException("outer", {0: wrapped(CheckpointException("inner", {1: wrapped(corrupt)}))})
    assert torch_ucp.rank_error(nested) is corrupt
    assert torch_ucp.rank_error(CheckpointException("x", {0: wrapped(KeyboardInterrupt())})) is None
    assert torch_ucp.rank_error(ValueError("not DCP's")) is None


def test_save_and_load_without_process_group(tmp_path):
    url = str(tmp_path / "one")
    torch_ucp.save(_state(), url)
    with pytest.raises(torch_ucp.CheckpointExistsError):
        torch_ucp.save(_state(), url)
    torch_ucp.save(_state(5.0), url, overwrite=True)
    state = _state(0.0)
    torch_ucp.load(state, url)
    assert torch.equal(state["model"]["w"], torch.full((16, 4), 5.0))
    with pytest.raises(ValueError, match="give strict="):
        torch_ucp.load(state, url, strict=True, planner=torch_ucp.UCPLoadPlanner())


def test_every_error_is_a_checkpoint_error_and_the_builtin_callers_expect():
    expected = {
        "CheckpointExistsError": FileExistsError,
        "CheckpointNotFoundError": FileNotFoundError,
        "LoadPlanError": ValueError,
        "SavePlanError": ValueError,
        "PatternError": ValueError,
        "KeyNotFoundError": KeyError,
    }
    for name, builtin in expected.items():
        cls = getattr(torch_ucp, name)
        assert issubclass(cls, torch_ucp.CheckpointError) and issubclass(cls, builtin), name
    for name in ("CommitConflictError", "CorruptCheckpointError", "UnsafeCheckpointError", "UnsupportedFormatError"):
        assert issubclass(getattr(torch_ucp, name), torch_ucp.CheckpointError), name
    # KeyError quotes its argument; ours reads as the sentence it is
    assert str(torch_ucp.KeyNotFoundError("'x' is not in the checkpoint")) == "'x' is not in the checkpoint"


def test_plan_and_lookup_errors_are_checkpoint_errors(tmp_path):
    url = str(tmp_path / "c")
    with pytest.raises(torch_ucp.SavePlanError, match="model.m: cannot save a tensor on the meta device"):
        torch_ucp.save({"model": {"m": torch.empty(2, device="meta")}}, url)
    with pytest.raises(torch_ucp.PatternError, match="renames map several keys to one name"):
        planner = torch_ucp.UCPSavePlanner(patterns=[Rename(r"\.[ab]$", ".x")])
        torch_ucp.save({"model": {"a": torch.ones(2), "b": torch.ones(2)}}, url, planner=planner)
    torch_ucp.save(_state(), url)
    ckpt = torch_ucp.open_checkpoint(url)
    with pytest.raises(torch_ucp.KeyNotFoundError, match="'model.nope' is not in the checkpoint"):
        ckpt.read("model.nope")
    with pytest.raises(KeyError, match="'step' is a non-tensor value"):  # still a KeyError
        ckpt.tensor_entry("step")
