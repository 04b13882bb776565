"""DeepSpeed universal checkpoint import (issue 6): real ``ds_to_universal`` output -> PyTorch.

DeepSpeed (CPU, gloo, 2 processes) trains ``TinyModel`` with ZeRO-1 and ZeRO-3, saves, and
converts with ``ds_to_universal``; the checkpoints are made once per session. They are then loaded
with ``DeepSpeedUniversalReader`` into a plain model + ``torch.optim.AdamW`` in one process and
into an FSDP2 model over 2 gloo processes, and compared bit for bit with DeepSpeed's own full
fp32 parameters, Adam moments and step (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``).

Guards against DeepSpeed#6691 (resumed ZeRO-3 training behaving like a fresh start: the step and
moments must come back) and the ZeRO-3 flat-tensor layout of ``ds_to_universal``.

DeepSpeed is needed only to MAKE the checkpoints (see tests/support/deepspeed_ckpt.py for the
install commands). Without it these tests fail under CI (``CI`` set) and skip, with the reason,
elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tests.support.deepspeed_ckpt import TinyModel, make_universal_checkpoint
from torch_ucp.demo.launch import run_distributed
from torch_ucp.errors import CheckpointNotFoundError
from torch_ucp.interop import DeepSpeedUniversalReader

pytestmark = pytest.mark.timeout(300)

STAGES = (1, 3)
PLANNERS = ("default", "ucp")
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def make_planner(kind: str):
    if kind == "default":
        return DefaultLoadPlanner(allow_partial_load=True)
    # Imported here, and never skipped: the project's own planner must load these too.
    import torch_ucp

    return torch_ucp.UCPLoadPlanner(allow_partial_load=True)


@pytest.fixture(scope="session")
def ds_universal(tmp_path_factory):
    """``ds_universal(stage)`` -> info dict of a real universal checkpoint, made once a session."""
    if importlib.util.find_spec("deepspeed") is None:
        message = (
            "DeepSpeed is not installed; install it with: DS_ACCELERATOR=cpu DS_BUILD_OPS=0 "
            "pip install --no-build-isolation --no-deps deepspeed==0.19.8 && pip install einops "
            "hjson msgpack ninja packaging psutil py-cpuinfo pydantic tqdm"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("deepspeed_ucp")
    made: dict[int, dict] = {}

    def get(stage: int) -> dict:
        if stage not in made:
            made[stage] = make_universal_checkpoint(base / f"zero{stage}", stage)
        return made[stage]

    return get


def load_reference(info: dict) -> dict[str, torch.Tensor]:
    return torch.load(info["reference"], weights_only=True)


def assert_matches_reference(model, optim, ref, names, *, full=lambda t: t) -> None:
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(names)
    for name in names:
        param = params[name]
        got = full(param.detach())
        assert torch.equal(got, ref[f"{name}.fp32"]), f"fp32 of {name} differs"
        state = optim.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(full(state[key]), ref[f"{name}.{key}"]), f"{key} of {name} differs"
        assert torch.equal(state["step"], ref["step"]), f"step of {name}: {state['step']}"


def fresh_model_and_optim(seed: int = 1234):
    torch.manual_seed(seed)
    model = TinyModel()
    optim = torch.optim.AdamW(model.parameters(), lr=0.123, betas=(0.5, 0.6), weight_decay=0.2)
    return model, optim


# ----------------------------------------------------------------------- single process


@pytest.mark.parametrize("planner", PLANNERS)
@pytest.mark.parametrize("stage", STAGES)
def test_load_into_plain_model_and_adamw(ds_universal, stage, planner):
    info = ds_universal(stage)
    ref = load_reference(info)
    model, optim = fresh_model_and_optim()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}

    reader = DeepSpeedUniversalReader(info["universal_dir"])
    dcp.load(state, storage_reader=reader, planner=make_planner(planner))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])

    assert_matches_reference(model, optim, ref, info["param_names"])
    assert ref["step"].item() == info["steps"]
    # param_groups are not offered by default: the target keeps its own hyperparameters.
    assert optim.param_groups[0]["lr"] == 0.123
    assert optim.param_groups[0]["betas"] == (0.5, 0.6)
    # The model trains on from the loaded state.
    model(torch.randint(0, 37, (2, 5))).sum().backward()
    optim.step()
    assert all(s["step"].item() == info["steps"] + 1 for s in optim.state.values())


def test_metadata_and_pickling(ds_universal):
    info = ds_universal(3)
    reader = DeepSpeedUniversalReader(info["universal_dir"])
    md = reader.read_metadata()
    keys = md.state_dict_metadata
    for name in info["param_names"]:
        for key in (
            f"model.{name}",
            f"optim.state.{name}.exp_avg",
            f"optim.state.{name}.exp_avg_sq",
            f"optim.state.{name}.step",
        ):
            assert key in keys, key
            chunks = keys[key].chunks
            assert len(chunks) == 1 and all(o == 0 for o in chunks[0].offsets)
    # ZeRO-3 files are flat; the shapes come from the model-states param_shapes.
    assert tuple(keys["model.embed.weight"].size) == (37, 13)
    assert tuple(keys["optim.state.layers.0.weight.exp_avg"].size) == (21, 13)
    assert tuple(keys["optim.state.head.weight.step"].size) == ()
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.path == reader.path
    # The folder holding ``latest_universal`` works too.
    parent = DeepSpeedUniversalReader(os.path.dirname(info["universal_dir"]))
    assert set(parent.read_metadata().state_dict_metadata) == set(keys)


@pytest.mark.parametrize("stage", STAGES)
def test_load_through_fsspec_url(ds_universal, stage):
    """A non-local fsspec filesystem (``memory://``): files are opened, never memory-mapped."""
    import fsspec

    info = ds_universal(stage)
    fs = fsspec.filesystem("memory")
    remote = f"/ds_ucp_test_{os.getpid()}/zero{stage}"
    fs.put(info["universal_dir"], remote, recursive=True)
    try:
        model, optim = fresh_model_and_optim()
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd}
        reader = DeepSpeedUniversalReader(f"memory://{remote}")
        dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(
            model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        assert_matches_reference(model, optim, load_reference(info), info["param_names"])
    finally:
        fs.rm(remote, recursive=True)


def test_model_only_cast_to_target_dtype(ds_universal):
    info = ds_universal(1)
    ref = load_reference(info)
    model = TinyModel().to(torch.bfloat16)
    state = {"model": model.state_dict()}
    dcp.load(
        state,
        storage_reader=DeepSpeedUniversalReader(info["universal_dir"]),
        planner=DefaultLoadPlanner(allow_partial_load=True),
    )
    model.load_state_dict(state["model"])
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param.detach(), ref[f"{name}.fp32"].to(torch.bfloat16)), name


def test_step_as_float_and_param_groups(ds_universal):
    info = ds_universal(3)
    model, optim = fresh_model_and_optim()
    msd, osd = get_state_dict(model, optim)
    osd["state"]["head.weight"]["step"] = 0.0  # an optimizer keeping a python number
    state = {"model": msd, "optim": osd}
    reader = DeepSpeedUniversalReader(
        info["universal_dir"], step_as="float", load_param_groups=True
    )
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    assert state["optim"]["state"]["head.weight"]["step"] == float(info["steps"])
    assert isinstance(state["optim"]["state"]["head.weight"]["step"], float)
    group = state["optim"]["param_groups"][0]
    assert group["lr"] == 0.01 and tuple(group["betas"]) == (0.9, 0.95)
    assert group["weight_decay"] == 0.01
    assert sorted(group["params"]) == sorted(info["param_names"])  # never overwritten


def test_only_needed_files_are_read(ds_universal, tmp_path):
    info = ds_universal(1)
    ref = load_reference(info)
    copy = tmp_path / "universal"
    shutil.copytree(info["universal_dir"], copy)
    for path in copy.glob("zero/*/exp_avg*.pt"):
        path.unlink()
    (copy / "zero" / "optimizer_state.pt").unlink()
    model = TinyModel()
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=DeepSpeedUniversalReader(copy))
    model.load_state_dict(state["model"])
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), ref[f"{name}.fp32"]), name


def test_vocabulary_padding_is_stripped(ds_universal, tmp_path):
    """A vocabulary tensor still carrying padding rows is cut to ``original_vocab_size``."""
    info = ds_universal(1)
    ref = load_reference(info)
    copy = tmp_path / "universal"
    shutil.copytree(info["universal_dir"], copy)
    for state_name in STATES:
        path = copy / "zero" / "embed.weight" / f"{state_name}.pt"
        saved = torch.load(path, weights_only=True)
        padded = torch.cat([saved["param"], torch.full((3, 13), 7.0)])
        torch.save({"param": padded, "cat_dim": 0, "vocab_tensor": True}, path)
    states_file = copy / "mp_rank_00_model_states.pt"
    model_states = torch.load(states_file, weights_only=True)
    model_states["universal_checkpoint_info"]["original_vocab_size"] = 37
    torch.save(model_states, states_file)

    model, optim = fresh_model_and_optim()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    reader = DeepSpeedUniversalReader(copy)
    assert tuple(reader.read_metadata().state_dict_metadata["model.embed.weight"].size) == (37, 13)
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_matches_reference(model, optim, ref, info["param_names"])


# ----------------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        DeepSpeedUniversalReader(missing).read_metadata()
    # dcp.load reports a reader's error inside a CheckpointException (a BaseException).
    with pytest.raises(CheckpointException, match="no_such_checkpoint.*does not exist"):
        dcp.load(
            {"model": TinyModel().state_dict()}, storage_reader=DeepSpeedUniversalReader(missing)
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not a DeepSpeed universal checkpoint"):
        DeepSpeedUniversalReader(tmp_path / "empty").read_metadata()


@pytest.mark.parametrize("stage", STAGES)
def test_missing_exp_avg_file_names_fqn_and_file(ds_universal, tmp_path, stage):
    info = ds_universal(stage)
    copy = tmp_path / "universal"
    shutil.copytree(info["universal_dir"], copy)
    missing = copy / "zero" / "layers.0.weight" / "exp_avg.pt"
    missing.unlink()
    model, optim = fresh_model_and_optim()
    msd, osd = get_state_dict(model, optim)
    with pytest.raises((FileNotFoundError, CheckpointException)) as excinfo:
        dcp.load(
            {"model": msd, "optim": osd},
            storage_reader=DeepSpeedUniversalReader(copy),
            planner=DefaultLoadPlanner(allow_partial_load=True),
        )
    message = str(excinfo.value)
    assert "CheckpointNotFoundError" in message  # a torch_ucp error (and a FileNotFoundError)
    assert "optim.state.layers.0.weight.exp_avg" in message
    assert str(missing) in message


def test_missing_parameter_folder_names_fqn_and_file(ds_universal, tmp_path):
    info = ds_universal(3)
    copy = tmp_path / "universal"
    shutil.copytree(info["universal_dir"], copy)
    shutil.rmtree(copy / "zero" / "norm.bias")
    model, optim = fresh_model_and_optim()
    msd, osd = get_state_dict(model, optim)
    with pytest.raises((FileNotFoundError, CheckpointException)) as excinfo:
        dcp.load(
            {"model": msd, "optim": osd},
            storage_reader=DeepSpeedUniversalReader(copy),
            planner=DefaultLoadPlanner(allow_partial_load=True),
        )
    message = str(excinfo.value)
    assert "model.norm.bias" in message or "optim.state.norm.bias" in message
    assert str(copy / "zero" / "norm.bias") in message


# ----------------------------------------------------------------------- FSDP2, 2 processes


def _fsdp2_worker(planner: str, infos: list[dict]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))
    for info in infos:
        ref = load_reference(info)
        model, _ = fresh_model_and_optim()
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optim = torch.optim.AdamW(model.parameters(), lr=0.123)
        msd, osd = get_state_dict(model, optim)
        assert isinstance(msd["embed.weight"], DTensor)
        assert isinstance(osd["state"]["layers.1.weight"]["exp_avg"], DTensor)
        state = {"model": msd, "optim": osd}
        dcp.load(
            state,
            storage_reader=DeepSpeedUniversalReader(info["universal_dir"]),
            planner=make_planner(planner),
        )
        set_state_dict(
            model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

        def full(t):
            return t.full_tensor() if isinstance(t, DTensor) else t

        assert_matches_reference(model, optim, ref, info["param_names"], full=full)
        # Uneven shards (13 and 37 rows over 2 ranks) hold the right rows locally.
        local = model.embed.weight.to_local()
        rows = local.shape[0]
        start = 0 if rank == 0 else 19
        assert torch.equal(local, ref["embed.weight.fp32"][start : start + rows])


@pytest.mark.parametrize("planner", PLANNERS)
def test_load_into_fsdp2_two_processes(ds_universal, planner):
    infos = [ds_universal(stage) for stage in STAGES]
    run_distributed(_fsdp2_worker, 2, planner, infos)
