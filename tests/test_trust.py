"""Nothing in a checkpoint runs code, nothing outside it is read, nothing oversized is allocated.

- A pickle payload (unpickling it creates a marker file) in a torch_ucp value, in a stock DCP
  ``.metadata`` and in a stock DCP bytes item is never run by ``dcp.load``, ``open_checkpoint``
  or any ``torch-ucp`` command; the opt-ins (``allow_pickle``, ``--trust-pickle``) do run it
  (the payload is live, so its absence means something).
- A model + AdamW checkpoint loads bit-exact (param_groups included, tuples as tuples) with
  ``pickle`` and ``torch.load`` patched to raise; version-1 checkpoints, whose tuples are
  ``torch_save``, load with ``allow_pickle=True`` and name the key and the opt-in without it.
- Symbolic links (data objects, data folders, ``.metadata``) are refused unless
  ``follow_symlinks=True``; FIFOs are refused without blocking.
- A value or fragment claiming more bytes than its data object holds fails before allocating.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tests.support import format_v2 as spec
from tests.support.dcp_io import load_plain as _load
from tests.support.dcp_io import save_plain as _save
from tests.support.payload import Payload
from torch_ucp import (
    CorruptCheckpointError,
    UCPLoadPlanner,
    UCPReader,
    UCPWriter,
    UnsafeCheckpointError,
    open_checkpoint,
)
from torch_ucp.cli.main import main as cli
from torch_ucp.metadata.checksums import BlockGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v1")


def _failure(e: BaseException) -> BaseException:
    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e


# -- pickle payloads ---------------------------------------------------------------------------
@pytest.fixture
def evil(tmp_path):
    """Three checkpoints carrying the payload, and the marker path it would create."""
    marker = str(tmp_path / "PWNED")
    ucp = str(tmp_path / "ucp")
    _save(ucp, {"w": torch.ones(3), "step": 3, "evil": Payload(marker)}, allow_pickle=True)
    stock_bytes = str(tmp_path / "stock-bytes")
    dcp.save({"w": torch.ones(3), "evil": Payload(marker)}, checkpoint_id=stock_bytes, no_dist=True)
    stock_meta = str(tmp_path / "stock-meta")
    dcp.save({"w": torch.ones(3)}, checkpoint_id=stock_meta, no_dist=True)
    with open(os.path.join(stock_meta, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    assert not os.path.exists(marker)
    return {"ucp": ucp, "stock-bytes": stock_bytes, "stock-meta": stock_meta, "marker": marker,
            "out": str(tmp_path / "out")}


def test_payload_in_a_value_never_runs_in_dcp_load_or_open_checkpoint(evil):
    with pytest.raises(CheckpointException) as e:
        _load(evil["ucp"], {"w": torch.zeros(3), "step": 0, "evil": None})
    exc = _failure(e.value)
    assert isinstance(exc, UnsafeCheckpointError) and "'evil'" in str(exc) and "allow_pickle=True" in str(exc)
    ckpt = open_checkpoint(evil["ucp"])
    assert ckpt.metadata.values["evil"].encoding == "torch_save"
    with pytest.raises(UnsafeCheckpointError, match="'evil'.*allow_pickle=True"):
        ckpt.read("evil")
    assert ckpt.read("step") == 3 and torch.equal(ckpt.read("w"), torch.ones(3))
    assert not os.path.exists(evil["marker"])
    # the opt-in does unpickle (the payload is live)
    open_checkpoint(evil["ucp"], allow_pickle=True).read("evil")
    assert os.path.exists(evil["marker"])


def test_payload_in_a_value_mislabelled_as_json_or_cbor_never_runs(evil):
    for encoding in ("json", "cbor", "raw"):
        header = spec.read_header(evil["ucp"])
        header["values"]["evil"]["encoding"] = encoding
        spec.write_header(evil["ucp"], header)  # a consistent forgery: re-signed
        try:
            value = open_checkpoint(evil["ucp"]).read("evil")
            assert encoding == "raw" and isinstance(value, bytes)  # raw: the bytes, as bytes
        except CorruptCheckpointError as e:
            assert "'evil'" in str(e)
    assert not os.path.exists(evil["marker"])


def test_stock_bytes_item_loads_with_weights_only_unless_trusted(evil):
    reader = FileSystemReader(evil["stock-bytes"])
    with pytest.raises(CheckpointException) as e:
        _load("", {"w": torch.zeros(3), "evil": None}, reader=reader)
    exc = _failure(e.value)
    assert isinstance(exc, UnsafeCheckpointError), exc
    assert "'evil'" in str(exc) and "UCPLoadPlanner(allow_pickle=True)" in str(exc)
    assert not os.path.exists(evil["marker"])
    state = _load("", {"w": torch.zeros(3)}, reader=FileSystemReader(evil["stock-bytes"]),
                  planner=UCPLoadPlanner(allow_partial_load=True))
    assert torch.equal(state["w"], torch.ones(3))
    _load("", {"w": torch.zeros(3), "evil": None}, reader=FileSystemReader(evil["stock-bytes"]),
          planner=UCPLoadPlanner(allow_pickle=True))
    assert os.path.exists(evil["marker"])  # the opt-in unpickles


# every command that reads a checkpoint, on each of the three: exit status, then no marker
COMMANDS = [
    ("inspect", "{ckpt}"),
    ("inspect", "--json", "{ckpt}"),
    ("export", "{ckpt}", "{out}/hf"),
    ("export", "{ckpt}", "{out}/all.pt", "--format", "torch"),
    ("convert", "{ckpt}", "{out}/converted"),
    ("verify", "{ckpt}"),
]


@pytest.mark.parametrize("which", ["ucp", "stock-bytes", "stock-meta"])
def test_no_cli_command_runs_a_payload(evil, which, capsys):
    statuses = {}
    for i, command in enumerate(COMMANDS):
        out = f"{evil['out']}/{i}"
        argv = [a.format(ckpt=evil[which], out=out) for a in command]
        statuses[" ".join(command)] = cli(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if statuses[" ".join(command)] == 1 and which != "ucp" and command[0] != "verify":
            assert "--trust-pickle" in err, err  # says why, and what to pass
        assert not os.path.exists(evil["marker"]), command
    if which == "ucp":
        # metadata and tensors need no pickle; reading the pickled value needs the opt-in
        assert statuses == {"inspect {ckpt}": 0, "inspect --json {ckpt}": 0, "export {ckpt} {out}/hf": 0,
                            "export {ckpt} {out}/all.pt --format torch": 1,
                            "convert {ckpt} {out}/converted": 1, "verify {ckpt}": 0}
    else:  # a stock .metadata is a pickle: refused without --trust-pickle
        assert set(statuses.values()) == {1}, statuses


def test_inspect_shows_each_value_encoding(tmp_path, capsys):
    url = str(tmp_path / "ckpt")
    _save(url, {"step": 1, "blob": b"x", "betas": (0.9, 0.99), "obj": Payload("/nonexistent/x")},
          allow_pickle=True)
    assert cli(["inspect", "--json", url]) == 0
    values = json.loads(capsys.readouterr().out)["values"]
    assert {k: v["encoding"] for k, v in values.items()} == {
        "step": "json", "blob": "raw", "betas": "cbor", "obj": "torch_save"
    }


def test_trust_pickle_reads_stock_checkpoints(evil, capsys):
    assert cli(["inspect", "--trust-pickle", evil["stock-bytes"]]) == 0
    assert "evil" in capsys.readouterr().out
    assert not os.path.exists(evil["marker"])  # inspect reads no value


# -- model + AdamW without pickle ----------------------------------------------------------------
def _model_and_optim(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.85, 0.95), weight_decay=0.1)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    optim.step()
    return model, optim


def test_adamw_checkpoint_loads_bit_exact_with_pickle_disabled(tmp_path, monkeypatch):
    url = str(tmp_path / "ckpt")
    model, optim = _model_and_optim(0)
    msd, osd = get_state_dict(model, optim)
    _save(url, {"model": msd, "optim": osd, "step": 7})
    meta = open_checkpoint(url).metadata
    assert "torch_save" not in {o.encoding for o in meta.values.values()}

    def refuse(*args, **kwargs):
        raise AssertionError("pickle or torch.load was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    target_model, target_optim = _model_and_optim(1)  # other values, same structure
    tmsd, tosd = get_state_dict(target_model, target_optim)
    state = _load(url, {"model": tmsd, "optim": tosd, "step": 0})
    set_state_dict(target_model, target_optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    assert state["step"] == 7
    for (k, a), b in zip(model.state_dict().items(), target_model.state_dict().values()):
        assert torch.equal(a, b), k
    got, want = target_optim.state_dict(), optim.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert type(got["param_groups"][0]["betas"]) is tuple
    for p, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(got["state"][p][k], v), (p, k)
    assert open_checkpoint(url).read("optim.param_groups.0.betas") == (0.85, 0.95)


def test_version_1_tuples_need_the_opt_in(tmp_path):
    url = os.path.join(FIXTURES, "adamw-1proc")
    key = "optim.param_groups.0.betas"
    with pytest.raises(UnsafeCheckpointError, match=f"'{key}'.*allow_pickle=True"):
        open_checkpoint(url).read(key)
    reference = torch.load(os.path.join(FIXTURES, "adamw-1proc.reference.pt"), weights_only=True)
    assert open_checkpoint(url, allow_pickle=True).read(key) == reference["optim"]["param_groups"][0]["betas"]
    target = {"model": {k: torch.zeros_like(v) for k, v in reference["model"].items()}}
    with pytest.raises(CheckpointException) as e:
        _load(url, target | {"optim": {"param_groups": [{"betas": None}]}},
              planner=UCPLoadPlanner(allow_partial_load=True))
    assert key in str(_failure(e.value)) and "allow_pickle=True" in str(_failure(e.value))
    state = _load(url, target | {"optim": {"param_groups": [{"betas": None}]}},
                  reader=UCPReader(url, allow_pickle=True), planner=UCPLoadPlanner(allow_partial_load=True))
    assert state["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for k, v in reference["model"].items():
        assert torch.equal(state["model"][k], v), k


def test_stock_save_planner_values_are_stored_without_pickle(tmp_path):
    url = str(tmp_path / "ckpt")
    state = {"w": torch.arange(4.0), "betas": (0.9, 0.95), "step": 3, "size": torch.Size([2])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=UCPWriter(url), planner=DefaultSavePlanner(), no_dist=True)
    ckpt = open_checkpoint(url)
    assert {k: o.encoding for k, o in ckpt.metadata.values.items()} == {
        "betas": "cbor", "step": "json", "size": "cbor"
    }
    assert ckpt.read("betas") == (0.9, 0.95) and type(ckpt.read("size")) is torch.Size
    with pytest.raises(CheckpointException) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"obj": Payload("/nonexistent/x")}, storage_writer=UCPWriter(str(tmp_path / "b")),
                 planner=DefaultSavePlanner(), no_dist=True)
    assert isinstance(_failure(e.value), UnsafeCheckpointError) and "'obj'" in str(_failure(e.value))


# -- staying inside the checkpoint -----------------------------------------------------------
@pytest.fixture
def plain(tmp_path):
    url = str(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 1024, generator=g), "b": torch.randn(16, generator=g), "step": 5}
    _save(url, state, threads=1)
    ckpt = open_checkpoint(url)
    (obj,) = {f.data.object for fqn in ckpt.keys() if fqn in ckpt.metadata.tensors for f in ckpt.fragments(fqn)}
    return url, state, obj


def _read_all(url: str, state: dict, **kwargs) -> None:
    ckpt = open_checkpoint(url, **kwargs)
    assert torch.equal(ckpt.read("w"), state["w"])
    assert torch.equal(ckpt.read("w", (slice(0, 64), slice(100, 900))), state["w"][:, 100:900])
    assert ckpt.read("step") == state["step"]
    _load(url, {"w": torch.zeros(64, 1024), "b": torch.zeros(16), "step": 0},
          reader=UCPReader(url, **kwargs))


@pytest.mark.parametrize("link", ["data-object", "data-folder", "metadata"])
def test_symlinks_are_refused_unless_followed(plain, tmp_path, link):
    """The link points at an exact copy outside the folder (checksums match): still refused."""
    url, state, obj = plain
    outside = tmp_path / "outside"
    outside.mkdir()
    rel = {"data-object": obj, "data-folder": obj.split("/")[0], "metadata": ".metadata"}[link]
    src = os.path.join(url, rel)
    dst = str(outside / os.path.basename(rel))
    shutil.move(src, dst)
    os.symlink(dst, src)
    with pytest.raises(UnsafeCheckpointError, match="symbolic link.*follow_symlinks=True"):
        open_checkpoint(url).read("w")
    with pytest.raises(CheckpointException) as e:
        _load(url, {"w": torch.zeros(64, 1024), "b": torch.zeros(16), "step": 0})
    assert "follow_symlinks=True" in str(_failure(e.value))  # DCP rewraps metadata errors
    assert cli(["verify", url]) == 1
    _read_all(url, state, follow_symlinks=True)


def test_fifo_is_refused_without_blocking(plain, capsys):
    url, state, obj = plain
    os.remove(os.path.join(url, obj))
    os.mkfifo(os.path.join(url, obj))
    for index in (None, (slice(0, 64), slice(0, 10))):  # one range, and memory-mapped ranges
        with pytest.raises(CorruptCheckpointError, match="not a regular file \\(a FIFO\\)"):
            open_checkpoint(url).read("w", index)
    with pytest.raises(CorruptCheckpointError, match="FIFO"):
        open_checkpoint(url).read("step")
    assert cli(["verify", url]) == 1
    assert "FIFO" in capsys.readouterr().out


def test_oversized_lengths_fail_before_allocating(plain):
    url, state, obj = plain
    header = spec.read_header(url)  # a consistent forgery: header and index re-signed
    header["values"]["step"]["byte_length"] = 5 << 30
    header["values"]["step"]["checksums"] = [0] * (5 << 30 >> 16)
    header["tensors"]["w"]["shape"] = [64 << 14, 1024]  # 4 GiB claimed by one fragment
    index = spec.read_index(url, header, 0)
    row = int(np.flatnonzero(index["tensor_key"] == spec.tensor_key("w"))[0])
    spans = spec.checksum_slices(index)
    index["lengths"][row] = [64 << 14, 1024]
    index["byte_length"][row] = (64 << 14) * 1024 * 4
    count = int(BlockGrid.for_fragment((64 << 14, 1024), 4, index["block"], index["block_width"]).count)
    index["checksums"] = np.concatenate(
        [index["checksums"][: spans[row].start], np.zeros(count, "<u4"), index["checksums"][spans[row].stop :]]
    )
    index["checksum_count"][row] = count
    spec.write_index(url, header, index)
    spec.write_header(url, header)
    ckpt = open_checkpoint(url, verify=False)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            ckpt.read("step")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water mark
    out = torch.empty(16, 1024)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        ckpt.read("w", (slice(1 << 19, (1 << 19) + 16),), out=out)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        ckpt.read("w", (slice(1 << 19, (1 << 19) + 256),))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 << 10
