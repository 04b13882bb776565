"""A save never destroys what it does not own (torch_ucp.storage.commit).

- Two jobs (separate processes) save to one URL, 30 trials each on local disk and on S3 (the
  moto server, over HTTP), the second starting 0-0.5 s after the first: never an unloadable URL,
  never a reported success that was not committed (a success that is not the final commit must
  be the commit the final one replaced), failures are clean torch_ucp errors, and only the
  committed save's data remains.
- A user's ``data-raw/`` (and other entries) beside a checkpoint survive every save.
- A save that hits ENOSPC on a real (tmpfs) filesystem removes its partial data, and its retry
  succeeds once space is back.
- Writer options are validated; an empty URL is an error.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from tests.support.dcp_io import save_plain as _save
from tests.support.save_jobs import Outcome, SaveJob, job_state
from torch_ucp import (
    CheckpointExistsError,
    CommitConflictError,
    UCPWriter,
    UnsafeCheckpointError,
    open_checkpoint,
)
from torch_ucp.storage import commit
from torch_ucp.storage.store import Store, open_store
from torch_ucp.verify import verify_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TRIALS = 30
CLEAN_FAILURES = {"CommitConflictError", "CheckpointExistsError"}


def _data_folders(store: Store) -> set[str]:
    return {n for n in store.list_dir("") if commit.save_id_of(n) or n.endswith(commit.INCOMING)}


def _check_trial(store: Store, outcomes: list[tuple[int, Outcome]], previous: tuple[str, int] | None,
                 overwrite: bool, size: tuple[int, int]) -> tuple[str, int] | None:
    """Check one trial's end state; returns the committed (save id, seed)."""
    for seed, o in outcomes:
        if not o.ok:
            assert o.checkpoint_error and o.error in CLEAN_FAILURES, (seed, o)
    succeeded = {o.save_id: seed for seed, o in outcomes if o.ok}
    if overwrite or previous is None:
        assert succeeded, outcomes  # someone always commits
    if not succeeded:
        committed = previous
    else:
        sid = open_checkpoint(store.url, **store.storage_options).metadata.save_id
        assert sid in succeeded, (sid, outcomes)
        committed = (sid, succeeded[sid])
        for other in set(succeeded) - {sid}:
            # both succeeded: then the other was committed first and this one replaced it
            marker = commit.read_marker(store, sid)
            assert marker["base"]["save_id"] == other, (marker, outcomes)
    assert committed is not None
    ckpt = open_checkpoint(store.url, **store.storage_options)
    assert ckpt.metadata.save_id == committed[0]
    expected = job_state(committed[1], *size)
    for k, v in expected["model"].items():
        assert torch.equal(ckpt.read(f"model.{k}"), v), k
    assert ckpt.read("betas") == (0.9, 0.999)
    if committed != previous:
        assert verify_checkpoint(store.url, **store.storage_options).ok
    assert _data_folders(store) == {commit.data_folder(committed[0])}, outcomes
    assert "data-raw" in store.list_dir("")  # a user's folder beside it survives
    return committed


def _race(base_url: str, options: dict, user_folder, size: tuple[int, int]) -> dict[str, int]:
    """``TRIALS`` trials of two jobs saving ``size`` (tensors, rows of 4 KiB) to one URL, the
    second starting 0-0.5 s after the first; returns outcome counts."""
    rng = random.Random(12)
    jobs = [SaveJob(*size), SaveJob(*size)]
    counts = {"trials": 0, "both_committed_in_turn": 0, "one_failed": 0, "both_failed": 0}
    try:
        committed = None
        url = ""
        for trial in range(TRIALS):
            fresh = trial % 3 == 0
            if fresh:
                url = f"{base_url}/race-{trial}"
                user_folder(url)
                committed = None
            overwrite = not fresh or trial % 2 == 1
            store = open_store(url, options)
            seeds = (1000 + 2 * trial, 1001 + 2 * trial)
            first = rng.randrange(2)
            at = time.time() + 0.02
            jobs[first].start(url, options, overwrite, seeds[first], at)
            # staggered by 0-0.5 s; every other trial by at most 50 ms, so races happen even
            # where saves are fast
            delay = rng.uniform(0, 0.5 if trial % 2 else 0.05)
            jobs[1 - first].start(url, options, overwrite, seeds[1 - first], at + delay)
            outcomes = [(seeds[i], jobs[i].result()) for i in range(2)]
            committed = _check_trial(store, outcomes, committed, overwrite, size)
            ok = sum(o.ok for _, o in outcomes)
            counts["trials"] += 1
            counts[{2: "both_committed_in_turn", 1: "one_failed", 0: "both_failed"}[ok]] += 1
    finally:
        for job in jobs:
            job.close()
    return counts


def _local_user_folder(url: str) -> None:
    os.makedirs(os.path.join(url, "data-raw"))
    with open(os.path.join(url, "data-raw", "notes.txt"), "w") as f:
        f.write("mine")


def test_two_jobs_saving_to_one_local_url(tmp_path):
    counts = _race(str(tmp_path), {}, _local_user_folder, (4, 512))  # 8 MiB saves
    print("local:", counts)
    assert counts["trials"] == TRIALS
    assert counts["one_failed"] > 0  # the races did overlap


def test_two_jobs_saving_to_one_s3_url(s3_bucket):
    url, options = s3_bucket
    fs = open_store(url, options).fs

    def user_folder(u: str) -> None:
        fs.pipe(u.removeprefix("s3://") + "/data-raw/notes.txt", b"mine")

    counts = _race(url, options, user_folder, (2, 128))  # 1 MiB saves
    print("s3:", counts)
    assert counts["trials"] == TRIALS
    assert counts["one_failed"] > 0


# -- what cleanup removes ----------------------------------------------------------------------
def _foreign_entries(url: str) -> dict[str, bytes]:
    """Entries beside a checkpoint that torch_ucp must never touch."""
    return {
        "data-raw/notes.txt": b"mine",
        "data-20240101T000000-deadbeef/results.csv": b"a user's folder with a save-id-like name",
        "data-20240101T000000-0123abcd.tar": b"a file, not a folder",
        "__0_0.distcp": b"stock DCP data",
        "notes.txt": b"hello",
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cleanup_removes_only_its_own_data(where, tmp_path, request):
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/ckpt"
    else:
        url, options = str(tmp_path / "ckpt"), {}
    store = open_store(url, options)
    for rel, data in _foreign_entries(url).items():
        if store.posix:
            os.makedirs(os.path.dirname(store.path(rel)), exist_ok=True)
        store.write_atomic(rel, data)
    for seed in range(3):
        _save(url, job_state(seed, 2, 64), overwrite=True, **options)
    ckpt = open_checkpoint(url, **options)
    for rel, data in _foreign_entries(url).items():
        assert store.read_bytes(rel) == data, rel
    assert _data_folders(store) == {
        commit.data_folder(ckpt.metadata.save_id), "data-20240101T000000-deadbeef"
    }


def test_empty_url_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        UCPWriter("")
    writer = UCPWriter()
    with pytest.raises(ValueError, match="non-empty"):
        writer.reset("")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"checksum_block_bytes": -1}, ValueError),
        ({"checksum_block_bytes": 0}, ValueError),
        ({"checksum_block_bytes": 1000}, ValueError),  # not a multiple of 16
        ({"checksum_block_bytes": 1.5}, TypeError),
        ({"checksum_block_width": 8}, ValueError),
        ({"checksum_block_width": 1 << 30}, ValueError),  # wider than a block
        ({"overwrite": "no"}, TypeError),
        ({"overwrite": 1}, TypeError),
        ({"threads": -3}, ValueError),
        ({"threads": 0}, ValueError),
        ({"threads": True}, TypeError),
        ({"threads": "4"}, TypeError),
        ({"allow_pickle": "yes"}, TypeError),
    ],
)
def test_writer_options_are_validated(tmp_path, kwargs, error):
    with pytest.raises(error, match="UCPWriter: " + next(iter(kwargs))):
        UCPWriter(str(tmp_path / "ckpt"), **kwargs)


def test_knob_values_are_validated_too(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_UCP_CHECKSUM_BLOCK_BYTES", "-1")
    with pytest.raises(ValueError, match="checksum_block_bytes"):
        UCPWriter(str(tmp_path / "ckpt"))


# -- the protocol step by step -----------------------------------------------------------------
def test_publish_fails_cleanly_when_the_data_was_removed(tmp_path):
    url = str(tmp_path / "ckpt")
    store = open_store(url)
    commit.begin(store, "20260101T000000-00000001", overwrite=False)
    shutil.rmtree(os.path.join(url, "data-20260101T000000-00000001"))
    with pytest.raises(CommitConflictError, match="was removed"):
        commit.publish(store, "20260101T000000-00000001", b"{}", overwrite=False)
    assert not os.path.exists(os.path.join(url, ".metadata"))


def test_commit_is_conditional_on_what_the_save_started_from(tmp_path):
    """Both saves start from an empty URL: the second to publish fails, whatever overwrite."""
    url = str(tmp_path / "ckpt")
    store = open_store(url)
    a, b, c = "20260101T000000-0000000a", "20260101T000000-0000000b", "20260101T000000-0000000c"
    for sid in (a, b, c):
        commit.begin(store, sid, overwrite=True)
    commit.publish(store, a, b'{"save_id": "a"}', overwrite=True)
    with pytest.raises(CommitConflictError, match=f"another save \\(save {a}\\) committed"):
        commit.publish(store, b, b'{"save_id": "b"}', overwrite=True)
    with pytest.raises(CheckpointExistsError, match="while this save ran"):
        commit.publish(store, c, b'{"save_id": "c"}', overwrite=False)
    assert store.read_bytes(".metadata") == b'{"save_id": "a"}'
    assert commit.current(store).save_id == a
    # a save that started after a's commit replaces it
    d = "20260101T000000-0000000d"
    commit.begin(store, d, overwrite=True)
    commit.publish(store, d, b'{"save_id": "d"}', overwrite=True)
    assert commit.current(store).save_id == d
    assert commit.read_marker(store, d)["base"]["save_id"] == a


@pytest.mark.parametrize("overwrite, error", [(False, CheckpointExistsError), (True, CommitConflictError)])
def test_a_save_whose_folder_is_removed_while_it_begins_fails_cleanly(tmp_path, overwrite, error):
    """Save b finds an empty URL and starts creating its folder; save a commits right then and
    its cleanup removes b's folder (b can never commit). b's begin raises the conflict as a
    torch_ucp error (it was a bare FileNotFoundError once) and leaves nothing behind."""
    url = str(tmp_path / "ckpt")
    store = open_store(url)
    a, b = "20260101T000000-0000000a", "20260101T000000-0000000b"
    commit.begin(store, a, overwrite=overwrite)
    write_atomic = store.write_atomic

    def commit_a_after_b_marks_its_folder(rel: str, data: bytes) -> None:
        write_atomic(rel, data)
        if rel.startswith(commit.data_folder(b)):
            commit.publish(store, a, b'{"save_id": "a"}', overwrite=overwrite)
            assert commit.remove_stale(store, a) == [commit.data_folder(b) + commit.INCOMING]

    store.write_atomic = commit_a_after_b_marks_its_folder
    with pytest.raises(error, match=f"save {b} .*save {a}"):
        commit.begin(store, b, overwrite=overwrite)
    store.write_atomic = write_atomic
    assert commit.current(store).save_id == a
    assert _data_folders(store) == {commit.data_folder(a)}


def test_cleanup_from_an_outdated_commit_spares_live_saves(tmp_path):
    """Commits a -> b; save x started before b (dead once b commits), save s after b (live).
    Cleanup seen from b removes a and x; seen from an outdated a, or from b, never s or b."""
    url = str(tmp_path / "ckpt")
    store = open_store(url)
    a, b, s, x = (f"20260101T000000-0000000{c}" for c in "ab5e")
    commit.begin(store, a, overwrite=True)
    commit.publish(store, a, b"{}", overwrite=True)
    commit.begin(store, x, overwrite=True)  # base a
    commit.begin(store, b, overwrite=True)  # base a
    commit.publish(store, b, b"{ }", overwrite=True)
    assert commit.remove_stale(store, a) == []  # seen from a, nothing is dead yet
    commit.begin(store, s, overwrite=True)  # base b; its start-time cleanup is seen from b
    assert _data_folders(store) == {commit.data_folder(b), commit.data_folder(s)}  # a, x gone
    assert commit.remove_stale(store, a) == []  # an outdated view spares b and s
    assert commit.remove_stale(store, b) == []  # s may still commit
    commit.publish(store, s, b"{  }", overwrite=True)  # and it does
    assert commit.current(store).save_id == s


def test_a_failed_save_removes_its_own_data(tmp_path):
    """A value with no pickle-free encoding fails the save while writing: its folder goes."""
    url = str(tmp_path / "ckpt")
    _save(url, {"w": torch.ones(4)})
    committed = open_checkpoint(url).metadata.save_id
    with pytest.raises(CheckpointException) as e:
        _save(url, {"w": torch.zeros(4), "obj": object()}, overwrite=True)
    exc = next(iter(e.value.failures.values()))[0]
    assert isinstance(exc, UnsafeCheckpointError) and "'obj'" in str(exc)
    assert sorted(os.listdir(url)) == [".metadata", commit.data_folder(committed)]
    assert torch.equal(open_checkpoint(url).read("w"), torch.ones(4))


# -- ENOSPC on a real filesystem ---------------------------------------------------------------
def _namespace_command() -> list[str] | None:
    """A command prefix giving the child a private mount namespace where it may mount a tmpfs."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "--user", "--map-root-user", "--mount"], [unshare, "--mount"]):
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_save_retried_after_enospc_succeeds(tmp_path):
    prefix = _namespace_command()
    if prefix is None:
        pytest.skip("needs `unshare` (a private mount namespace for a small tmpfs)")
    root = tmp_path / "small-disk"
    root.mkdir()
    script = os.path.join(os.path.dirname(__file__), "support", "enospc_save.py")
    proc = subprocess.run(
        [*prefix, "sh", "-c", f'mount -t tmpfs -o size=24m tmpfs "{root}" && exec "{sys.executable}" "{script}" "{root}"'],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first_save"] == "None"
    assert out["enospc"], out["failure"]  # the save really ran out of space
    assert out["a_loads_after_failure"]  # the committed checkpoint is untouched
    assert out["free_after_failure"] == out["free_before"], out  # its partial data was removed
    assert len([e for e in out["entries_after_failure"] if e.startswith("data-")]) == 1
    # 10 MiB free: enough for the 8 MiB save, not if the failed one's data were still there
    assert out["retry"] == "None", out
    assert out["b_loads_after_retry"]
    assert len([e for e in out["entries_after_retry"] if e.startswith("data-")]) == 1
