"""Loading the model alone from a model + AdamW checkpoint, on another world size (issue 13).

4 gloo ranks train an FSDP2 model one AdamW step and save model + optimizer with
``torch_ucp.save``; 2 ranks then load only the model, with ``UCPLoadPlanner``'s defaults (as
stock ``DefaultLoadPlanner``: checkpoint keys absent from the target are ignored) and with
stock ``DefaultLoadPlanner`` through ``UCPReader``: both must give every parameter's
``full_tensor()`` bit for bit. A key missing from the checkpoint still raises, naming it and the
option; ``strict=True`` refuses the optimizer keys the target leaves out.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

import torch_ucp
from torch_ucp.demo.launch import run_distributed

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]

REFERENCE = "reference.pt"


def _model(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An FSDP2 model of uneven shards (13 and 7 rows over 2 and 4 ranks) and its AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 13), torch.nn.ReLU(), torch.nn.Linear(13, 7))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _save_trained(base: str) -> None:
    torch.set_num_threads(1)
    model, optim = _model(dist.get_world_size())
    g = torch.Generator().manual_seed(dist.get_rank())
    model(torch.randn(5, 6, generator=g)).sum().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    torch_ucp.save({"model": msd, "optim": osd, "step": 1}, f"{base}/step-1")
    reference = {f"model.{k}": _full(v) for k, v in msd.items()}
    assert osd["state"], "AdamW state was saved"
    if dist.get_rank() == 0:
        torch.save(reference, os.path.join(base, REFERENCE))


def _load_model_only(base: str) -> dict:
    torch.set_num_threads(1)
    url = f"{base}/step-1"
    reference = torch.load(os.path.join(base, REFERENCE), weights_only=True)
    out: dict = {}
    for name in ("ucp", "stock"):
        model, _ = _model(dist.get_world_size())
        for p in model.parameters():
            p.data.fill_(-1.0)  # nothing stays from the init
        state = {"model": get_model_state_dict(model)}
        if name == "ucp":
            torch_ucp.load(state, url)
        else:
            dcp.load(state, storage_reader=torch_ucp.UCPReader(url), planner=DefaultLoadPlanner())
        set_model_state_dict(model, state["model"])
        msd = get_model_state_dict(model)
        out[name] = {
            k: torch.equal(_full(v).view(torch.uint8), reference[f"model.{k}"].view(torch.uint8))
            for k, v in msd.items()
        }
        assert isinstance(msd["0.weight"], DTensor)
    # a target key the checkpoint lacks still raises, naming it and the option
    model, _ = _model(dist.get_world_size())
    state = {"model": get_model_state_dict(model), "extra": torch.zeros(3)}
    try:
        torch_ucp.load(state, url)
    except torch_ucp.LoadPlanError as e:
        out["missing"] = str(e)
    state["extra"] = torch.arange(3.0)
    torch_ucp.load(state, url, allow_missing=["extra"])
    out["extra_kept"] = torch.equal(state["extra"], torch.arange(3.0))
    # strict: every saved key must be loaded
    try:
        torch_ucp.load({"model": get_model_state_dict(model)}, url, strict=True)
    except torch_ucp.LoadPlanError as e:
        out["strict"] = str(e)
    return out


@pytest.fixture(scope="module")
def model_only(tmp_path_factory) -> list[dict]:
    base = str(tmp_path_factory.mktemp("partial"))
    run_distributed(_save_trained, 4, base)
    return run_distributed(_load_model_only, 2, base)


def test_model_only_load_is_bit_exact_with_default_planner(model_only):
    for rank in model_only:
        for name in ("ucp", "stock"):
            assert rank[name] == {k: True for k in ("0.weight", "0.bias", "2.weight", "2.bias")}


def test_missing_key_raises_naming_it_and_the_option(model_only):
    for rank in model_only:
        assert "missing from" in rank["missing"] and "step-1: extra (pass allow_missing=True" in rank["missing"]
        assert rank["extra_kept"]


def test_strict_refuses_the_optimizer_keys(model_only):
    for rank in model_only:
        message = rank["strict"]
        assert "but not in the target state dict: " in message
        assert "optim.state.0.weight.exp_avg" in message and "step" in message
        assert "(strict=True refuses them" in message
