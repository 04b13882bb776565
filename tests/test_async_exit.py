"""Asynchronous saves are never lost (issue 13): real interpreter exits.

Each case writes a small training script, runs it on two ranks as separate ``python``
processes joined by gloo (a file rendezvous), and checks their exit codes, their stderr and
the checkpoint on disk:

* a script whose last line is ``torch_ucp.async_save(...)`` (then changing the tensors, as
  training would) exits 0 after logging that it waits, and leaves a committed checkpoint equal
  to the state at the call;
* the same ending with ``dist.destroy_process_group()``: the destroy waits for the save first;
* ``destroy_process_group`` bound before the first save (so it bypasses the wait): the save
  fails with one error naming the cause, nothing is committed, the exit status is 1;
* a save that fails with nobody looking: the error is printed and the exit status is 1;
* ``torch_ucp.wait()`` waits for the save and re-raises a failure, which then counts as seen
  (the script exits 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from torch_ucp import CheckpointNotFoundError, open_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The state: seeded tensors sharded over the ranks, a replicated one and plain values; the
# script then changes every tensor in place, as the next training steps would.
PROLOGUE = """
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
{early_import}
import torch_ucp

rank, world, workdir, url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{{workdir}}/rendezvous", rank=rank,
                        world_size=world)
mesh = init_device_mesh("cpu", (world,))
g = torch.Generator().manual_seed(0)
state = {{f"layer{{i}}": distribute_tensor(torch.randn(256, 512, generator=g), mesh, [Shard(i % 2)],
                                          src_data_rank=None) for i in range(6)}}
state["bias"] = distribute_tensor(torch.randn(512, generator=g), mesh, [Replicate()],
                                  src_data_rank=None)
state["meta"] = {{"step": 7, "lr": [0.5]}}

def train_on():
    with torch.no_grad():
        for key, value in state.items():
            if key != "meta":
                value.to_local().add_(1.0)
    state["meta"]["step"] = 8
"""


def expected_state() -> dict:
    g = torch.Generator().manual_seed(0)
    out = {f"layer{i}": torch.randn(256, 512, generator=g) for i in range(6)}
    out["bias"] = torch.randn(512, generator=g)
    return out


def run_script(tmp_path, body: str, world: int = 2, url: str | None = None,
               early_import: str = "") -> tuple[str, list[subprocess.CompletedProcess]]:
    """Run PROLOGUE + ``body`` on ``world`` ranks, each its own interpreter; wait for all."""
    script = tmp_path / "train.py"
    script.write_text(PROLOGUE.format(early_import=early_import) + textwrap.dedent(body))
    url = url or str(tmp_path / "ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(world), str(tmp_path), url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        for rank in range(world)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return url, done


def assert_committed_at_call(url: str) -> None:
    ckpt = open_checkpoint(url)
    for key, value in expected_state().items():
        assert torch.equal(ckpt.read(key), value), f"{key}: not the state at the call"
    assert ckpt.read("meta.step") == 7
    assert ckpt.read("meta.lr") == [0.5]


def assert_nothing_committed(url: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        open_checkpoint(url)


def describe(results: list[subprocess.CompletedProcess]) -> str:
    return "\n".join(f"--- rank {i}: exit {r.returncode}\n{r.stderr[-3000:]}" for i, r in enumerate(results))


@pytest.mark.parametrize("ending", ["exit", "destroy_process_group"])
def test_script_ending_right_after_async_save_commits_the_state_at_the_call(tmp_path, ending):
    body = """
    torch_ucp.async_save(state, url)
    train_on()
    """
    if ending == "destroy_process_group":
        body += "dist.destroy_process_group()\n"
    url, results = run_script(tmp_path, body)
    assert all(r.returncode == 0 for r in results), describe(results)
    why = "interpreter is exiting" if ending == "exit" else "destroy_process_group() was called"
    for r in results:
        assert f"waiting for the checkpoint save to {url} to finish" in r.stderr, describe(results)
        assert why in r.stderr, describe(results)
        assert "cannot schedule new futures" not in r.stderr
    assert_committed_at_call(url)


def test_destroy_process_group_that_bypasses_the_wait_fails_the_save_with_its_cause(tmp_path):
    # Bound before the first async_save, so torch_ucp's wrapper cannot make it wait; the
    # background save is held until the group is gone, so the outcome does not depend on timing.
    body = """
    import threading
    gate = threading.Event()

    class HeldPlanner(torch_ucp.UCPSavePlanner):
        def set_up_planner(self, *args, **kwargs):
            assert gate.wait(60)
            return super().set_up_planner(*args, **kwargs)

    torch_ucp.async_save(state, url, planner=HeldPlanner())
    destroy_process_group()
    gate.set()
    """
    url, results = run_script(
        tmp_path, body, early_import="from torch.distributed import destroy_process_group"
    )
    assert all(r.returncode == 1 for r in results), describe(results)
    for r in results:
        assert "its process group was destroyed (torch.distributed.destroy_process_group())" in r.stderr
        assert "call torch_ucp.wait() before destroy_process_group()" in r.stderr
        assert "exiting with status 1" in r.stderr
    assert_nothing_committed(url)


def test_failed_save_nobody_looked_at_makes_the_exit_status_1(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    url, results = run_script(tmp_path, """
    torch_ucp.async_save(state, url)
    train_on()
    print("training finished", flush=True)
    """, url=str(blocker / "ckpt"))
    assert all(r.returncode == 1 for r in results), describe(results)
    for r in results:
        assert "training finished" in r.stdout
        assert f"the checkpoint save to {url} failed; exiting with status 1" in r.stderr
        assert "exiting with status 1" in r.stderr


def test_wait_waits_for_the_save_and_reraises_its_failure(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    good = tmp_path / "ckpt"
    url, results = run_script(tmp_path, f"""
    torch_ucp.wait()  # nothing in flight: returns at once
    handle = torch_ucp.async_save(state, url)
    train_on()
    torch_ucp.wait()
    assert handle.done().done()
    torch_ucp.async_save(state, {str(blocker / "ckpt")!r})
    try:
        torch_ucp.wait()
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        print("wait raised", type(e).__name__, flush=True)
    torch_ucp.wait()  # the failure was seen: nothing left
    dist.destroy_process_group()
    """, url=str(good))
    assert all(r.returncode == 0 for r in results), describe(results)
    for r in results:
        assert "wait raised CheckpointException" in r.stdout, describe(results)
        assert "waiting for the checkpoint save" not in r.stderr  # wait() did it already
    ckpt = open_checkpoint(url)
    values = expected_state()
    assert torch.equal(ckpt.read("layer3"), values["layer3"])  # before train_on()


def test_async_save_is_the_function_and_its_package_is_torch_ucp_asynchronous():
    import torch_ucp
    import torch_ucp.asynchronous as package

    assert callable(torch_ucp.async_save) and torch_ucp.async_save is package.async_save
    assert torch_ucp.wait is package.wait
    assert callable(package.close)  # was shadowed by the function under the old name
    assert "No save is lost" in package.__doc__  # what help(torch_ucp.asynchronous) shows
