"""Hugging Face safetensors weights into PyTorch models with ``dcp.load`` (issue 6).

A HF-style sharded folder (``model-0000i-of-00002.safetensors`` + ``model.safetensors.index.json``,
written with the ``safetensors`` library) is loaded through
``torch_ucp.interop.SafetensorsReader`` + ``UCPLoadPlanner(allow_partial_load=True)`` into

- a plain model in one process (no process group), and
- an FSDP2-sharded model (``fully_shard``, DTensor ``Shard(0)``, uneven row counts) over 2 gloo
  processes, where each rank must read only the byte ranges of its own rows,

and every parameter is compared bit for bit with the tensors written.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn

from torch_ucp import CheckpointNotFoundError, UCPLoadPlanner
from torch_ucp.demo.launch import run_distributed
from torch_ucp.interop import SafetensorsReader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Tiny(nn.Module):
    """Odd sizes, so FSDP2's Shard(0) splits rows unevenly over 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 7), nn.Linear(7, 6)])
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5, bias=False)


def reference(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        k: torch.randn(v.shape, generator=g).to(dtype) for k, v in Tiny().state_dict().items()
    }


def write_hf_sharded(folder: str, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Two shards + index, the layout ``save_pretrained`` writes."""
    os.makedirs(folder, exist_ok=True)
    keys = list(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({prefix + k: tensors[k] for k in part}, os.path.join(folder, name), {"format": "pt"})
        weight_map.update({prefix + k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("hf") / "llm")
    write_hf_sharded(folder, reference())
    return folder


def test_index_and_headers(hf_dir):
    reader = SafetensorsReader(hf_dir)
    md = reader.read_metadata()
    ref = reference()
    assert set(md.state_dict_metadata) == set(ref)
    for key, t in ref.items():
        saved = md.state_dict_metadata[key]
        assert tuple(saved.size) == tuple(t.shape) and saved.properties.dtype == t.dtype
        assert len(saved.chunks) == 1 and tuple(saved.chunks[0].sizes) == tuple(t.shape)
    assert reader.file_metadata == {"format": "pt"}
    # plain data only: the reader and its metadata travel to other ranks
    assert pickle.loads(pickle.dumps(reader)).path == hf_dir
    pickle.dumps(md)


def test_plain_model_bit_exact(hf_dir):
    model = Tiny()
    state = model.state_dict()  # tensors share storage with the parameters
    reader = SafetensorsReader(hf_dir)
    dcp.load(state, storage_reader=reader, planner=UCPLoadPlanner(allow_partial_load=True))
    ref = reference()
    for key, param in model.state_dict().items():
        assert torch.equal(param, ref[key]), key
    total = sum(t.numel() * t.element_size() for t in ref.values())
    assert reader.stats.bytes_read == reader.stats.bytes_needed == total


def test_bf16_weights_cast_into_fp32_model_and_single_file(tmp_path):
    ref = reference(torch.bfloat16)
    path = str(tmp_path / "model.safetensors")
    save_file(ref, path, {"format": "pt"})
    for source in (path, str(tmp_path)):  # the file, and the folder holding model.safetensors
        model = Tiny()
        dcp.load(
            model.state_dict(),
            storage_reader=SafetensorsReader(source),
            planner=UCPLoadPlanner(allow_partial_load=True),
        )
        for key, param in model.state_dict().items():
            assert param.dtype == torch.float32
            assert torch.equal(param, ref[key].float()), (source, key)


def test_prefix_and_missing_folder(hf_dir, tmp_path):
    model = Tiny()
    state = {"model": model.state_dict(), "step": 0}
    dcp.load(
        state,
        storage_reader=SafetensorsReader(hf_dir, prefix="model."),
        planner=UCPLoadPlanner(allow_partial_load=True),
    )
    ref = reference()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    assert state["step"] == 0  # not in the weights: left alone
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        SafetensorsReader(str(tmp_path / "nope")).read_metadata()


def _load_fsdp2(folder: str) -> dict:
    """Rank function: FSDP2 over 2 ranks, load HF weights, compare full tensors bit-exactly."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2,))
    model = Tiny()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = {"model": get_model_state_dict(model)}
    reader = SafetensorsReader(folder, prefix="model.")
    dcp.load(state, storage_reader=reader, planner=UCPLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])

    ref = reference()
    problems, local_rows = [], {}
    for key, value in get_model_state_dict(model).items():
        if not isinstance(value, DTensor) or value.placements != (Shard(0),):
            problems.append(f"{key}: not an FSDP2 Shard(0) DTensor")
            continue
        local_rows[key] = value.to_local().shape[0]
        if not torch.equal(value.full_tensor(), ref[key]):
            problems.append(f"{key}: differs")
    return {
        "problems": problems,
        "local_rows": local_rows,
        "read": reader.stats.bytes_read,
        "needed": reader.stats.bytes_needed,
    }


def test_fsdp2_sharded_model_bit_exact(hf_dir):
    results = run_distributed(_load_fsdp2, 2, hf_dir)
    ref = reference()
    total = sum(t.numel() * t.element_size() for t in ref.values())
    for r in results:
        assert r["problems"] == []
        assert r["read"] == r["needed"] < total  # only this rank's rows were read
    # uneven rows (11 -> 6 + 5, 7 -> 4 + 3, 5 -> 3 + 2) and together every row once
    for key, t in ref.items():
        assert results[0]["local_rows"][key] + results[1]["local_rows"][key] == t.shape[0]
    assert results[0]["local_rows"]["embed.weight"] == 6
    assert results[0]["needed"] + results[1]["needed"] == total
