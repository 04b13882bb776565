"""Checkpoints of format version 1 (written by the v1 encoder, tests/fixtures/v1) still load
bit-exact into any layout, and ``torch-ucp convert`` upgrades them to version 2."""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tests.support.matrix import load_layouts
from torch_ucp import UCPLoadPlanner, UCPReader, open_checkpoint
from torch_ucp.demo.launch import run_distributed
from torch_ucp.verify import verify_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

V1 = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
SAVED = ["ws4-fsdp-tp-strided", "ws4-hsdp", "ws1-plain"]


def test_fixtures_are_version_1():
    for name in [*SAVED, "adamw-1proc"]:
        with open(os.path.join(V1, name, ".metadata")) as f:
            assert json.load(f)["version"] == 1, name


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> str:
    base = str(tmp_path_factory.mktemp("v1"))
    for name in SAVED:
        shutil.copytree(os.path.join(V1, name), os.path.join(base, name))
    return base


def test_version1_loads_bit_exact_on_other_layouts(fixtures):
    one = load_layouts(fixtures, SAVED, ["ws1-plain"], {})
    two = run_distributed(load_layouts, 2, fixtures, SAVED, ["ws2-shard1"], {})
    four = run_distributed(load_layouts, 4, fixtures, SAVED, ["ws4-2d-swapped"], {})
    for per_rank in ([one], two, four):
        for case in per_rank[0]:
            assert [p for r in per_rank for p in r[case]["problems"]] == [], case


def test_version1_open_checkpoint_and_verify(fixtures):
    ckpt = open_checkpoint(os.path.join(fixtures, "ws4-fsdp-tp-strided"))
    assert ckpt.metadata.version == 1 and ckpt.metadata.indexes == []
    assert len(ckpt.fragments("model.emb")) == 4
    assert verify_checkpoint(os.path.join(fixtures, "ws4-hsdp")).ok


def test_convert_upgrades_version1_to_version2(fixtures, tmp_path):
    from torch_ucp.cli.main import main

    out = str(tmp_path / "v2")
    src = os.path.join(fixtures, "ws4-fsdp-tp-strided")
    assert main(["convert", src, out, "-q"]) == 0
    new, old = open_checkpoint(out), open_checkpoint(src)
    assert new.metadata.version == 2 and sorted(new.keys()) == sorted(old.keys())
    for fqn in old.metadata.tensors:
        assert torch.equal(new.read(fqn), old.read(fqn)), fqn
    for fqn in old.metadata.values:
        assert new.read(fqn) == old.read(fqn), fqn
    assert new.metadata.flatten_mapping == old.metadata.flatten_mapping
    assert verify_checkpoint(out).ok


def test_version1_adamw_state_loads(tmp_path):
    path = str(tmp_path / "adamw")
    shutil.copytree(os.path.join(V1, "adamw-1proc"), path)
    ref = torch.load(os.path.join(V1, "adamw-1proc.reference.pt"), weights_only=True)
    target = {
        "model": {k: torch.zeros_like(v) for k, v in ref["model"].items()},
        "optim": {
            "state": {k: {n: torch.zeros_like(t) for n, t in s.items()} for k, s in ref["optim"]["state"].items()},
            "param_groups": [{k: (0 if not isinstance(v, (list, tuple)) else type(v)(0 for _ in v))
                              for k, v in g.items()} for g in ref["optim"]["param_groups"]],
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # version 1 stored the betas tuple with torch.save: refused unless trusted, naming it
        with pytest.raises(CheckpointException, match=r"betas.*allow_pickle=True"):
            dcp.load(copy.deepcopy(target), storage_reader=UCPReader(path), planner=UCPLoadPlanner(), no_dist=True)
        dcp.load(target, storage_reader=UCPReader(path, allow_pickle=True), planner=UCPLoadPlanner(), no_dist=True)
    for k, v in ref["model"].items():
        assert torch.equal(target["model"][k], v), k
    for k, s in ref["optim"]["state"].items():
        for n, t in s.items():
            assert torch.equal(target["optim"]["state"][k][n], t), (k, n)
    assert target["optim"]["param_groups"] == ref["optim"]["param_groups"]
    assert isinstance(target["optim"]["param_groups"][0]["betas"], tuple)
