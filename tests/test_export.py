"""The export / convert Python API (torch_ucp.tools), in this process: what it writes, what it
returns, and the errors it raises for bad arguments (worded for Python callers, and for the CLI
through ``OptionError.render``). The CLI over it is covered by test_cli.py."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import torch_ucp
from tests.support.dcp_io import save_plain
from torch_ucp import CheckpointExistsError, CorruptCheckpointError, OptionError, open_checkpoint
from torch_ucp.sizes import parse_size
from torch_ucp.storage.builder import CheckpointBuilder
from torch_ucp.tools import (
    ExportPlan,
    convert_checkpoint,
    export_safetensors,
    export_torch,
    open_source,
    plan_export,
)


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "model.embed.weight": torch.randn(13, 7, generator=g),
        "model.proj.weight": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(9, generator=g).half(),
        "model.ids": torch.randint(-(2**40), 2**40, (5, 3), generator=g),
        "model.mask": torch.rand(7, 3, generator=g) > 0.5,
        "model.scale": torch.tensor(0.25),
        "optim.step": torch.tensor(12, dtype=torch.int32),
    }


VALUES = {"step": 42, "run": "tiny"}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("export") / "ckpt")
    with CheckpointBuilder(url) as builder:
        for key, t in reference().items():
            builder.add_tensor(key, t)
        for key, v in VALUES.items():
            builder.add_value(key, v)
    return url


def test_export_safetensors_writes_every_tensor_bit_exact(ckpt, tmp_path):
    done = []
    result = export_safetensors(ckpt, str(tmp_path / "hf"), progress=done.append)
    assert result.files == ["model.safetensors"] and result.source_format == "torch_ucp"
    assert (result.tensors, result.nbytes) == (len(reference()), nbytes(reference()))
    assert result.values == list(VALUES)  # skipped: safetensors holds tensors only
    assert sum(done) == result.nbytes and len(done) == result.tensors
    path = tmp_path / "hf" / "model.safetensors"
    loaded = load_file(path)
    assert set(loaded) == set(reference())
    for key, t in reference().items():
        assert same(loaded[key], t), key
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_plan_then_sharded_export_with_renames_and_cast(ckpt, tmp_path):
    """plan_export says what will be written without reading a tensor; its plan is exported
    as Hugging Face shards + index, floats cast, ints and bool keeping their dtype."""
    plan = plan_export(ckpt, keys=["model.*"], strip_prefix="model.", dtype=torch.bfloat16)
    ref = {k: t for k, t in reference().items() if k.startswith("model.")}
    assert [(it.name, it.key) for it in plan.tensors] == [(k.removeprefix("model."), k) for k in ref]
    expected = {k.removeprefix("model."): t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in ref.items()}
    assert {it.name: it.dtype for it in plan.tensors} == {k: t.dtype for k, t in expected.items()}
    assert plan.values == [] and plan.nbytes == nbytes(expected)

    out = tmp_path / "sharded"
    result = export_safetensors(plan, str(out), max_shard_size="200B")
    shards = result.files[:-1]
    assert result.files[-1] == "model.safetensors.index.json" and len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == nbytes(expected)
    seen = {}
    for shard in shards:
        part = load_file(out / shard)
        assert nbytes(part) <= 200 or len(part) == 1
        seen.update({k: (t, shard) for k, t in part.items()})
    assert set(seen) == set(expected) == set(index["weight_map"])
    for key, t in expected.items():
        assert same(seen[key][0], t) and index["weight_map"][key] == seen[key][1], key


def test_export_torch_keeps_values_and_fills_records_in_place(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    result = export_torch(open_source(ckpt), str(tmp_path / "out"))  # a folder gets model.pt
    assert result.out == str(tmp_path / "out" / "model.pt") and result.values == list(VALUES)
    state = torch.load(result.out, weights_only=True)
    assert list(state) == [*reference(), *VALUES]
    for key, t in reference().items():
        assert same(state[key], t), key
    assert {k: state[k] for k in VALUES} == VALUES
    assert sorted(os.listdir(tmp_path / "out")) == ["model.pt"]  # no temporary file left


def test_export_torch_of_a_value_holding_tensors(tmp_path, caplog):
    """A value that holds tensors (a stock DCP value saved with torch.save) cannot be laid out
    record by record: the export says so and writes the whole state at once, still exact."""
    stock = str(tmp_path / "stock")
    w = torch.arange(12.0).reshape(3, 4)
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": w, "extra": (torch.ones(2), 3)}, checkpoint_id=stock, no_dist=True)  # a tuple stays one value
    with caplog.at_level(logging.WARNING, logger="torch_ucp.tools.export"):
        result = export_torch(stock, str(tmp_path / "full.pt"), trust_pickle=True)
    assert "holding the whole state in memory" in caplog.text
    state = torch.load(result.out, weights_only=True)
    assert list(state) == ["w", "extra"] and same(state["w"], w)
    assert same(state["extra"][0], torch.ones(2)) and state["extra"][1] == 3


def test_convert_from_safetensors_and_torch_ucp(ckpt, tmp_path):
    hf = tmp_path / "hf"
    export_safetensors(ckpt, str(hf), keys=["model.*"])
    done = []
    result = convert_checkpoint(str(hf), str(tmp_path / "from-hf"), progress=done.append)
    ref = {k: t for k, t in reference().items() if k.startswith("model.")}
    assert (result.source_format, result.tensors, result.values, result.nbytes) == ("safetensors", len(ref), 0, nbytes(ref))
    assert sum(done) == result.nbytes
    converted = open_checkpoint(result.dst)
    assert converted.metadata.save_id == result.save_id
    for key, t in ref.items():
        assert same(converted.read(key), t), key

    saved = str(tmp_path / "saved")
    save_plain(saved, {"w": ref["model.embed.weight"], "step": 5})  # through dcp.save + UCPWriter
    result = convert_checkpoint(saved, str(tmp_path / "again"), keys=["w"])
    assert (result.source_format, result.tensors, result.values) == ("torch_ucp", 1, 0)
    assert same(open_checkpoint(result.dst).read("w"), ref["model.embed.weight"])

    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        convert_checkpoint(saved, str(tmp_path / "again"))
    assert convert_checkpoint(saved, str(tmp_path / "again"), overwrite=True).values == 1


def test_failed_export_leaves_no_file(ckpt, tmp_path):
    """A tensor that fails its checksum halfway through a sharded export: the error is the
    reader's, and no shard written before it is left looking like an export."""
    bad = tmp_path / "bad"
    with CheckpointBuilder(str(bad)) as builder:
        builder.add_tensor("a", torch.arange(64.0))
        builder.add_tensor("b", torch.arange(64.0) + 1)
    data = next(p for p in bad.rglob("*") if p.is_file() and p.name != ".metadata" and p.stat().st_size >= 512)
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of "b"
    data.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError):
        export_safetensors(str(bad), str(out), max_shard_size=256)
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    "call, python_message, cli_message",
    [
        (lambda c, t: plan_export(c, keys=["nope.*"]), r"matches keys=\['nope\.\*'\]", "matches --keys nope.*"),
        (lambda c, t: plan_export(c, strip_prefix="step"), r"strip_prefix='step' leaves key 'step' empty",
         "--strip-prefix 'step' leaves key"),
        (lambda c, t: plan_export(c, dtype=torch.int8), "dtype must be a floating-point", "--dtype must be"),
        (lambda c, t: export_safetensors(c, str(t / "x.safetensors"), max_shard_size="1GB"),
         "max_shard_size needs an output folder", "--max-shard-size needs an output folder"),
        (lambda c, t: export_safetensors(c, str(t), max_shard_size="lots"),
         "max_shard_size: cannot parse size 'lots'", "--max-shard-size: cannot parse"),
        (lambda c, t: export_torch(c, "s3://bucket/model.pt"), "out must be a local path", "OUT must be a local path"),
        (lambda c, t: convert_checkpoint(c, c), "the source and dst are the same", "the source and DST are the same"),
    ],
)
def test_bad_arguments_name_the_option(ckpt, tmp_path, call, python_message, cli_message):
    with pytest.raises(OptionError, match=python_message) as e:
        call(ckpt, tmp_path)
    assert isinstance(e.value, ValueError)
    flags = {"keys": "--keys", "strip_prefix": "--strip-prefix", "dtype": "--dtype", "out": "OUT",
             "dst": "DST", "max_shard_size": "--max-shard-size"}
    from torch_ucp.cli.common import _flag

    assert cli_message in e.value.render(lambda option, value: _flag(flags[option], value))


def test_existing_output_needs_overwrite(ckpt, tmp_path):
    export_safetensors(ckpt, str(tmp_path), max_shard_size=100)
    shards = sorted(os.listdir(tmp_path))
    with pytest.raises(OptionError, match="pass overwrite=True to replace them"):
        export_safetensors(ckpt, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == shards  # nothing touched
    assert export_safetensors(ckpt, str(tmp_path), overwrite=True).files == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["model.safetensors"]  # the stale shards are gone
    export_torch(ckpt, str(tmp_path / "m.pt"))
    with pytest.raises(OptionError, match="exists; pass overwrite=True"):
        export_torch(ckpt, str(tmp_path / "m.pt"))


def test_plan_and_keyword_arguments_are_exclusive(ckpt, tmp_path):
    plan = plan_export(ckpt, keys=["model.*"])
    assert isinstance(plan, ExportPlan)
    with pytest.raises(TypeError, match="belong to plan_export"):
        export_safetensors(plan, str(tmp_path), dtype=torch.float16)
    with pytest.raises(ValueError, match="keeps keys and dtypes"):
        convert_checkpoint(plan_export(ckpt, strip_prefix="model."), str(tmp_path / "c"))


def test_public_names():
    assert torch_ucp.export_safetensors is export_safetensors
    assert torch_ucp.export_torch is export_torch
    assert torch_ucp.convert_checkpoint is convert_checkpoint


@pytest.mark.parametrize(
    "text, size",
    [("1024", 1024), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 KB", 1500), ("3g", 3 * 2**30), ("7b", 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "0", "1 XB", "1e3"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
