"""Checkpoint management of a run folder of ``step-N`` checkpoints, local and on S3 (issue 13).

``list_checkpoints`` / ``latest_checkpoint`` / ``prune_checkpoints`` and ``torch-ucp ls`` /
``torch-ucp prune`` on real checkpoints saved by ``torch_ucp.save``, on local disk and on the
moto S3 server through s3fs. An incomplete step folder (data without ``.metadata``: a save in
progress or a failed one) is listed as such, never counted as the latest, never deleted. The
race: 2 gloo ranks save ``step-3`` and the coordinator is held after every rank's data is
written and before the commit, while prune runs; then the save commits and loads bit-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import fsspec
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import torch_ucp
from tests.support.console import TORCH_UCP
from torch_ucp.demo.launch import run_distributed
from torch_ucp.verify import verify_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]



def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 32, generator=g)}, "step": step}


def _files(fs, path: str) -> dict[str, int]:
    """Every object under ``path`` with its size."""
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    return {p: info["size"] for p, info in fs.find(path, detail=True).items()}


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    """``(run URL, storage options, fsspec filesystem, path of the run in it)``."""
    if request.param == "local":
        fs = fsspec.filesystem("file")
        yield str(tmp_path / "run"), {}, fs, str(tmp_path / "run")
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        yield f"{bucket}/run", options, fs, f"{bucket}/run".removeprefix("s3://")


def _make_incomplete(url: str, options: dict, fs, path: str, step: int) -> None:
    """A step folder as a save leaves it before its commit: every data object, no .metadata."""
    torch_ucp.save(_state(step), f"{url}/step-{step}", **options)
    fs.rm(f"{path}/step-{step}/.metadata")


def test_list_latest_and_prune(run):
    url, options, fs, path = run
    assert torch_ucp.list_checkpoints(url, **options) == []
    assert torch_ucp.latest_checkpoint(url, **options) is None
    for step in (2, 10, 9):
        torch_ucp.save(_state(step), f"{url}/step-{step}", **options)
    _make_incomplete(url, options, fs, path, 11)
    torch_ucp.save(_state(1), f"{url}/step-0001", **options)  # zero-padded names are steps too
    fs.pipe(f"{path}/notes.txt", b"not a checkpoint")

    listed = torch_ucp.list_checkpoints(url, **options)
    assert [(c.step, c.name, c.committed) for c in listed] == [
        (1, "step-0001", True), (2, "step-2", True), (9, "step-9", True), (10, "step-10", True),
        (11, "step-11", False),
    ]
    for c in listed[:-1]:
        meta = torch_ucp.open_checkpoint(c.url, **options).metadata
        assert (c.save_id, c.world_size, c.nbytes) == (meta.save_id, 1, 64 * 32 * 4)
        assert abs(c.created - time.time()) < 600
    assert listed[-1].save_id is None and listed[-1].nbytes is None

    latest = torch_ucp.latest_checkpoint(url, **options)
    assert (latest.step, latest.committed) == (10, True)  # step 11 is not committed
    state = _state(0)
    torch_ucp.load(state, latest.url, **options)
    assert torch.equal(state["model"]["w"], _state(10)["model"]["w"])

    incomplete = _files(fs, f"{path}/step-11")
    assert incomplete
    assert [c.step for c in torch_ucp.prune_checkpoints(url, 2, dry_run=True, **options)] == [1, 2]
    assert len(torch_ucp.list_checkpoints(url, **options)) == 5  # a dry run deletes nothing
    assert [c.step for c in torch_ucp.prune_checkpoints(url, 2, **options)] == [1, 2]
    assert [c.step for c in torch_ucp.list_checkpoints(url, **options)] == [9, 10, 11]
    assert not _files(fs, f"{path}/step-2") and not _files(fs, f"{path}/step-0001")
    assert _files(fs, f"{path}/step-11") == incomplete  # never touched
    assert torch_ucp.prune_checkpoints(url, 2, **options) == []
    assert [c.step for c in torch_ucp.prune_checkpoints(url, 1, **options)] == [9]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        torch_ucp.prune_checkpoints(url, 0, **options)
    state = _state(0)
    torch_ucp.load(state, f"{url}/step-10", **options)
    assert torch.equal(state["model"]["w"], _state(10)["model"]["w"])


def test_unreadable_committed_metadata_is_listed_with_its_error(tmp_path):
    url = str(tmp_path / "run")
    torch_ucp.save(_state(1), f"{url}/step-1")
    torch_ucp.save(_state(2), f"{url}/step-2")
    with open(f"{url}/step-2/.metadata", "wb") as f:
        f.write(b"garbage")
    listed = torch_ucp.list_checkpoints(url)
    assert [c.committed for c in listed] == [True, True]
    assert listed[0].error is None and "not JSON torch_ucp metadata" in listed[1].error
    # committed all the same: it counts as the newest for prune
    assert [c.step for c in torch_ucp.prune_checkpoints(url, 1)] == [1]


# ------------------------------------------------------------------------- a prune racing a save


class _HeldWriter(torch_ucp.UCPWriter):
    """A UCPWriter whose commit waits, after every rank's data is written, for ``<gate>.go``."""

    def __init__(self, url: str, gate: str, **options) -> None:
        super().__init__(url, **options)
        self.gate = gate

    def finish(self, metadata, results) -> None:
        open(f"{self.gate}.ready", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(f"{self.gate}.go") and time.monotonic() < deadline:
            time.sleep(0.01)
        super().finish(metadata, results)


def _held_save(url: str, gate: str, options: dict) -> int:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    rows = torch.arange(8 * 32, dtype=torch.float32).reshape(8, 32) + 1000 * rank
    state = {"model": {f"shard{rank}": rows, "shared": torch.full((4,), 3.0)}, "step": 3}
    dcp.save(state, storage_writer=_HeldWriter(url, gate, **options), planner=torch_ucp.UCPSavePlanner())
    return rank


def test_prune_racing_a_save(run, tmp_path):
    url, options, fs, path = run
    for step in (1, 2):
        torch_ucp.save(_state(step), f"{url}/step-{step}", **options)
    gate = str(tmp_path / "gate")
    saver = threading.Thread(
        target=lambda: run_distributed(_held_save, 2, f"{url}/step-3", gate, options), daemon=True
    )
    saver.start()
    deadline = time.monotonic() + 120
    while not os.path.exists(f"{gate}.ready"):
        assert saver.is_alive() and time.monotonic() < deadline, "the save never reached its commit"
        time.sleep(0.02)
    in_flight = _files(fs, f"{path}/step-3")
    assert in_flight and not any(p.endswith("/.metadata") for p in in_flight)
    # mid-save: step 3 is incomplete, so step 2 is the newest committed one and stays
    assert torch_ucp.latest_checkpoint(url, **options).step == 2
    assert [c.step for c in torch_ucp.prune_checkpoints(url, 1, **options)] == [1]
    assert _files(fs, f"{path}/step-3") == in_flight
    assert [(c.step, c.committed) for c in torch_ucp.list_checkpoints(url, **options)] == [
        (2, True), (3, False),
    ]
    open(f"{gate}.go", "w").close()
    saver.join(120)
    assert not saver.is_alive()
    # committed now: it becomes the latest and step 2 may go
    assert [c.step for c in torch_ucp.prune_checkpoints(url, 1, **options)] == [2]
    latest = torch_ucp.latest_checkpoint(url, **options)
    assert (latest.step, latest.world_size) == (3, 2)
    ckpt = torch_ucp.open_checkpoint(latest.url, **options)
    for rank in (0, 1):
        expected = torch.arange(8 * 32, dtype=torch.float32).reshape(8, 32) + 1000 * rank
        assert torch.equal(ckpt.read(f"model.shard{rank}"), expected)
    assert torch.equal(ckpt.read("model.shared"), torch.full((4,), 3.0)) and ckpt.read("step") == 3


def test_prune_in_a_loop_while_saving(tmp_path):
    """No hold: prune as fast as it can while 2 ranks save; the save must come out whole."""
    url = str(tmp_path / "run")
    torch_ucp.save(_state(1), f"{url}/step-1")
    gate = str(tmp_path / "gate")
    open(f"{gate}.go", "w").close()
    saver = threading.Thread(target=lambda: run_distributed(_held_save, 2, f"{url}/step-3", gate, {}))
    saver.start()
    prunes = 0
    while saver.is_alive():
        if torch_ucp.prune_checkpoints(url, 1):  # step 1 goes only once step 3 is committed
            assert os.path.exists(f"{url}/step-3/.metadata")
        prunes += 1
    saver.join()
    assert prunes > 0
    torch_ucp.prune_checkpoints(url, 1)
    assert [(c.step, c.committed) for c in torch_ucp.list_checkpoints(url)] == [(3, True)]
    report = verify_checkpoint(f"{url}/step-3")
    assert report.ok, report.problems


# ----------------------------------------------------------------------------- the commands


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([TORCH_UCP, *args], capture_output=True, text=True, env=env, timeout=240)


def _o(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


def test_ls_and_prune_commands(s3_bucket, tmp_path, capsys):
    """In this process (``main(argv)``: no start-up cost per command), and the last one through
    the console script."""
    from torch_ucp.cli.main import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    local = str(tmp_path / "run")
    bucket, options = s3_bucket
    remote = f"{bucket}/run"
    for step in (5, 7):
        torch_ucp.save(_state(step), f"{local}/step-{step}")
        torch_ucp.save(_state(step), f"{remote}/step-{step}", **options)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    _make_incomplete(remote, options, fs, remote.removeprefix("s3://"), 8)

    code, out, _ = run("ls", local)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["step", "status", "size", "saved", "(UTC)", "world", "size", "save", "id"]
    assert lines[1].split()[:4] == ["5", "committed", "8.00", "KiB"]
    assert lines[2].split()[:4] == ["7", "committed", "8.00", "KiB"]
    assert "2 committed checkpoints" in out
    code, out, _ = run("ls", remote, "--json", *_o(options))
    assert [(c["step"], c["committed"]) for c in json.loads(out)] == [(5, True), (7, True), (8, False)]
    assert run("ls", remote, "--latest", *_o(options))[1].strip() == f"{remote}/step-7"
    code, out, _ = run("prune", local, "--keep", "1", "--dry-run")
    assert out.splitlines()[0] == f"would delete {local}/step-5"
    assert os.path.exists(f"{local}/step-5/.metadata")
    code, _, err = run("prune", local, "--keep", "0")
    assert code == 2 and "--keep must be at least 1" in err
    code, _, err = run("ls", str(tmp_path / "nothing"), "--latest")
    assert code == 2
    assert err.strip() == f"torch-ucp ls: error: no committed step-N checkpoint under {tmp_path / 'nothing'}"

    pruned = _cli("prune", remote, "--keep", "1", *_o(options))
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.splitlines() == [
        f"deleted {remote}/step-5",
        "deleted 1 checkpoint; kept 1 committed checkpoint (step-7); left 1 incomplete alone (step-8)",
    ]
    assert [c.step for c in torch_ucp.list_checkpoints(remote, **options)] == [7, 8]
