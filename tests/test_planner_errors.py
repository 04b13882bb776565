"""UCPLoadPlanner strictness (keys: default, strict, allow_missing; shapes, kinds), dtype casts, and UCPWriter overwrite rules."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlan

from tests.support.dcp_io import load_plain
from tests.support.dcp_io import save_plain as _save
from torch_ucp import (
    CheckpointExistsError,
    LoadPlanError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    open_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.w": torch.randn(8, 6, generator=g),
        "layer.b": torch.randn(6, generator=g),
        "head.w": torch.randn(6, 4, generator=g),
    }


def _state(seed: int = 3) -> dict:
    return {"model": _model(seed), "step": 100 + seed, "tag": f"seed-{seed}"}


def _target() -> dict:
    return {
        "model": {k: torch.full_like(v, -7.0) for k, v in _model().items()},
        "step": 0,
        "tag": "",
    }


def _load(path: str, state: dict, **planner_kwargs) -> dict:
    return load_plain(path, state, planner=UCPLoadPlanner(**planner_kwargs))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("planner") / "ckpt")
    _save(path, _state())
    return path


def _load_error(path: str, state: dict, **planner_kwargs) -> str:
    """Load expecting a planning failure; returns the LoadPlanError message."""
    model = state.get("model", {})
    before = {k: v.clone() for k, v in model.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(CheckpointException) as e:
        _load(path, state, **planner_kwargs)
    msg = str(e.value)
    assert "LoadPlanError" in msg
    assert f"cannot load {path} into this state dict" in msg
    # planning fails before any byte is read: the target is untouched
    for k, v in before.items():
        assert torch.equal(state["model"][k], v), k
    return msg


def test_matching_target_loads_bit_exact(ckpt):
    state = _load(ckpt, _target())
    for k, v in _model().items():
        assert torch.equal(state["model"][k], v), k
    assert state["step"] == 103 and state["tag"] == "seed-3"


def test_key_missing_from_checkpoint(ckpt):
    state = _target()
    state["model"]["layer.extra"] = torch.zeros(3)
    msg = _load_error(ckpt, state)
    assert f"missing from {ckpt}: model.layer.extra (pass allow_missing=True" in msg


def test_checkpoint_keys_missing_from_target_are_ignored_by_default(ckpt):
    """As stock DefaultLoadPlanner: load a subset of the checkpoint (the model alone)."""
    state = _target()
    del state["model"]["head.w"]
    del state["tag"]
    _load(ckpt, state)
    for k in ("layer.w", "layer.b"):
        assert torch.equal(state["model"][k], _model()[k]), k
    assert state["step"] == 103
    assert set(state["model"]) == {"layer.w", "layer.b"} and "tag" not in state


def test_strict_refuses_checkpoint_keys_missing_from_target(ckpt):
    state = _target()
    del state["model"]["head.w"]
    del state["tag"]
    msg = _load_error(ckpt, state, strict=True)
    # the message itself (DCP's wrapper also quotes the source line that builds it)
    line = re.search(rf"in {re.escape(ckpt)} but not in the target state dict: ([^(]*) \(strict=True", msg)
    assert line is not None, msg
    assert sorted(line.group(1).strip().split(", ")) == ["model.head.w", "tag"]


def test_strict_loads_a_matching_target(ckpt):
    state = _load(ckpt, _target(), strict=True)
    assert torch.equal(state["model"]["head.w"], _model()["head.w"])


def test_many_unexpected_keys_are_listed_with_a_count(tmp_path):
    path = str(tmp_path / "wide")
    _save(path, {f"p{i:02d}": torch.full((2,), float(i)) for i in range(25)})
    msg = _load_error(path, {"p00": torch.zeros(2)}, strict=True)
    assert "p01" in msg and "(and 4 more)" in msg


def test_allow_missing_patterns(ckpt):
    state = _target()
    state["model"]["layer.extra"] = torch.arange(3.0)
    state["optim"] = {"lr": torch.ones(1)}
    msg = _load_error(ckpt, state, allow_missing=["optim.*"])  # model.layer.extra still an error
    assert f"missing from {ckpt}: model.layer.extra (pass" in msg and "optim.lr" not in msg
    _load(ckpt, state, allow_missing=["optim.*", "model.layer.*"])
    assert torch.equal(state["model"]["layer.extra"], torch.arange(3.0))  # left as it was
    assert torch.equal(state["optim"]["lr"], torch.ones(1))
    assert torch.equal(state["model"]["layer.w"], _model()["layer.w"])


def test_strict_with_allow_missing(ckpt):
    state = _target()
    state["model"]["layer.extra"] = torch.zeros(3)
    _load(ckpt, state, strict=True, allow_missing="model.layer.extra")
    del state["tag"]
    msg = _load_error(ckpt, state, strict=True, allow_missing=True)
    assert "but not in the target state dict: tag (strict=True" in msg


def test_allow_partial_load_conflicts_with_strict():
    with pytest.raises(ValueError, match="allow_missing=True instead"):
        UCPLoadPlanner(allow_partial_load=True, strict=True)


@pytest.mark.parametrize("shape", [(8, 5), (6, 8), (48,), (8, 6, 1)])
def test_shape_mismatch(ckpt, shape):
    state = _target()
    state["model"]["layer.w"] = torch.zeros(shape)
    msg = _load_error(ckpt, state)
    assert f"model.layer.w: shape mismatch: saved (8, 6), expected {shape}" in msg


def test_planner_raises_load_plan_error_directly(ckpt):
    """Outside dcp.load (no CheckpointException wrapper) the planner's own error type shows."""
    planner = UCPLoadPlanner(strict=True)
    planner.set_up_planner({"model.layer.w": torch.zeros(2, 2)}, UCPReader(ckpt).read_metadata())
    with pytest.raises(LoadPlanError) as e:
        planner.create_local_plan()
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "model.layer.w: shape mismatch: saved (8, 6), expected (2, 2)" in msg
    assert "model.head.w" in msg and "step" in msg


def test_all_problems_reported_together(ckpt):
    state = _target()
    state["model"]["layer.b"] = torch.zeros(7)
    state["model"]["new"] = torch.zeros(1)
    del state["model"]["head.w"]
    msg = _load_error(ckpt, state, strict=True)
    assert "model.new" in msg
    assert "model.head.w" in msg
    assert "model.layer.b: shape mismatch: saved (6,), expected (7,)" in msg


def test_allow_partial_load(ckpt):
    state = {
        "model": {
            "layer.w": torch.zeros(8, 6),
            "not_in_ckpt": torch.arange(5.0),
        },
        "step": -1,
    }
    untouched = state["model"]["not_in_ckpt"].clone()
    _load(ckpt, state, allow_partial_load=True)
    assert torch.equal(state["model"]["layer.w"], _model()["layer.w"])
    assert torch.equal(state["model"]["not_in_ckpt"], untouched)
    assert state["step"] == 103
    assert set(state["model"]) == {"layer.w", "not_in_ckpt"}
    assert "tag" not in state


def test_allow_partial_load_still_checks_shapes(ckpt):
    state = {"model": {"layer.w": torch.zeros(8, 7)}}
    msg = _load_error(ckpt, state, allow_partial_load=True)
    assert "model.layer.w: shape mismatch" in msg


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_change_casts(ckpt, dtype):
    state = _target()
    state["model"] = {k: torch.zeros(v.shape, dtype=dtype) for k, v in _model().items()}
    _load(ckpt, state)
    for k, v in _model().items():
        got = state["model"][k]
        assert got.dtype == dtype
        assert torch.equal(got, v.to(dtype)), k


def test_dtype_change_casts_in_open_checkpoint_out(ckpt):
    out = torch.empty(8, 6, dtype=torch.bfloat16)
    open_checkpoint(ckpt).read("model.layer.w", out=out)
    assert torch.equal(out, _model()["layer.w"].to(torch.bfloat16))


def test_value_saved_tensor_target(ckpt):
    state = _target()
    state["step"] = torch.zeros(())
    msg = _load_error(ckpt, state)
    assert "step: saved as a non-tensor value, target is a tensor" in msg


def test_tensor_saved_value_target(ckpt):
    state = _target()
    state["model"]["layer.b"] = 0
    msg = _load_error(ckpt, state)
    assert "model.layer.b: saved as a tensor of shape (6,), target is int" in msg


def test_unflattened_load_places_values(tmp_path):
    path = str(tmp_path / "unflat")
    w = _model(8)["layer.w"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"w": w, "step": 108, "cfg": {"lr": 0.5}},
            storage_writer=UCPWriter(path),
            planner=UCPSavePlanner(flatten_state_dict=False),
            no_dist=True,
        )
    state = {"w": torch.zeros(8, 6), "step": 0, "cfg": {"lr": 0.0}}
    _load(path, state, flatten_state_dict=False)
    assert torch.equal(state["w"], w)  # tensors do load
    assert (state["step"], state["cfg"]) == (108, {"lr": 0.5})


# -- overwrite ---------------------------------------------------------------------------------


def _snapshot(path: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _save_id(path: str) -> str:
    with open(os.path.join(path, ".metadata")) as f:
        return json.load(f)["save_id"]


def test_save_over_existing_checkpoint_refused(tmp_path):
    path = str(tmp_path / "ckpt")
    _save(path, _state(3))
    before = _snapshot(path)
    with pytest.raises(CheckpointException) as e:
        _save(path, _state(4))
    msg = str(e.value)
    assert "CheckpointExistsError" in msg
    assert f"{path} already holds a committed checkpoint" in msg
    assert "overwrite=True" in msg
    assert _snapshot(path) == before  # nothing written, nothing removed
    state = _load(path, _target())
    for k, v in _model(3).items():
        assert torch.equal(state["model"][k], v), k
    assert state["step"] == 103


def test_writer_raises_checkpoint_exists_error_directly(tmp_path):
    path = str(tmp_path / "ckpt")
    _save(path, _state(3))
    writer = UCPWriter(path)
    writer.set_up_storage_writer(True)
    with pytest.raises(CheckpointExistsError, match=re.escape(path)) as e:
        writer.prepare_global_plan([SavePlan([])])
    assert isinstance(e.value, FileExistsError)


def test_overwrite_replaces_and_removes_old_data(tmp_path):
    path = str(tmp_path / "ckpt")
    _save(path, _state(3))
    old_id = _save_id(path)
    assert os.path.isdir(os.path.join(path, f"data-{old_id}"))
    _save(path, _state(4), overwrite=True)
    new_id = _save_id(path)
    assert new_id != old_id
    assert sorted(os.listdir(path)) == [".metadata", f"data-{new_id}"]
    state = _load(path, _target())
    for k, v in _model(4).items():
        assert torch.equal(state["model"][k], v), k
    assert (state["step"], state["tag"]) == (104, "seed-4")


def test_overwrite_into_fresh_folder_is_fine(tmp_path):
    path = str(tmp_path / "fresh")
    _save(path, _state(5), overwrite=True)
    assert torch.equal(open_checkpoint(path).read("model.head.w"), _model(5)["head.w"])


def test_overwrite_with_different_keys(tmp_path):
    path = str(tmp_path / "ckpt")
    _save(path, _state(3))
    _save(path, {"only": torch.arange(4)}, overwrite=True)
    ckpt = open_checkpoint(path)
    assert ckpt.keys() == ["only"]
    assert torch.equal(ckpt.read("only"), torch.arange(4))
    with pytest.raises(CheckpointException, match="LoadPlanError"):
        _load(path, _target())


def test_copied_checkpoint_is_independent(tmp_path):
    """Checkpoints are relocatable: object paths are relative to the root."""
    src = str(tmp_path / "a")
    _save(src, _state(6))
    dst = str(tmp_path / "b")
    shutil.copytree(src, dst)
    shutil.rmtree(src)
    state = _load(dst, _target())
    assert torch.equal(state["model"]["layer.w"], _model(6)["layer.w"])
