"""TorchTitan through torch_ucp (issue 13): the real ``torchtitan`` package, its llama3 model
(``debugmodel`` flavor, 2 of its 6 layers) parallelized by ``parallelize_llama`` with FSDP2 x TP on 4 CPU gloo
ranks, saved by :class:`torch_ucp.integrations.torchtitan.UCPCheckpointManager` (sync, async
and async-with-pinned-memory to local disk, async to S3 with storage options), then loaded by
the same manager on 2 ranks FSDP-only. Every model and optimizer tensor equals the reference
``full_tensor()`` taken at the save, bit for bit, and so do the LR scheduler's state and the
step TorchTitan finds as the latest.

What a CPU box needs, and why (each is done here, for this test only):

* ``import torchtitan.models.llama3`` reaches ``torchtitan.distributed.minimal_async_ep.kernels``
  (the MoE expert-parallel kernels), which imports ``triton``, a CUDA-only package. Without it,
  that one module is replaced by a stand-in whose functions raise; dense llama3 never calls them.
* TorchTitan picks its device type as ``_get_available_device_type() or "cuda"``, so on a CPU
  box it builds its DeviceMesh for CUDA. The test sets ``device_type = "cpu"`` in
  ``torchtitan.distributed.parallel_dims``.
* FlexAttention has no CPU backward in torch 2.13 (``NotImplementedError``), so the training
  steps give every parameter a deterministic gradient and run the real optimizer and LR
  scheduler instead of a backward pass; the checkpointed state is the same kind of state.
* ``spmd_backend="partial_dtensor"`` (DTensor FSDP2 + TP, the layout torch_ucp reshards); the
  default ``spmd_types`` backend fails on a CPU mesh before any checkpointing.
* The model's TP sharding config is set with ``set_llama3_sharding_config`` directly: the
  config's ``update_from_config`` imports the whole trainer (datasets, torchdata, ...).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

import pytest

if sys.version_info < (3, 11):
    pytest.skip("torchtitan 0.3 needs Python >= 3.11", allow_module_level=True)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from torch_ucp import open_checkpoint  # noqa: E402
from torch_ucp.demo.launch import run_distributed  # noqa: E402

SAVED_STEP = 2
MODES = {  # folder name -> (async_mode, remote)
    "sync": ("disabled", False),
    "async": ("async", False),
    "pinned": ("async_with_pinned_mem", False),
    "s3": ("async", True),
}


def _cpu_torchtitan() -> None:
    """The two CPU workarounds described in the module docstring."""
    kernels = "torchtitan.distributed.minimal_async_ep.kernels"
    if importlib.util.find_spec("triton") is None and kernels not in sys.modules:
        stand_in = types.ModuleType(kernels)

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)

            def needs_triton(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError(f"{name} is a triton (CUDA) kernel; triton is not installed")

            return needs_triton

        stand_in.__getattr__ = __getattr__  # type: ignore[attr-defined]
        sys.modules[kernels] = stand_in
    import torchtitan.distributed.parallel_dims as parallel_dims

    parallel_dims.device_type = "cpu"


def _build(dp_shard: int, tp: int):
    """llama3 debugmodel, parallelize_llama, TorchTitan's AdamW container and LR schedulers."""
    _cpu_torchtitan()
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import model_registry, parallelize_llama
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    parallelism = ParallelismConfig(
        data_parallel_shard_degree=dp_shard, tensor_parallel_degree=tp,
        spmd_backend="partial_dtensor",
    )
    model_config = model_registry("debugmodel").model
    model_config.layers = model_config.layers[:2]  # of 6: the test's time is the model's size
    set_llama3_sharding_config(model_config, enable_sp=parallelism.enable_sequence_parallel)
    with torch.device("meta"):
        model = model_config.build()
    dims = ParallelDims.from_config(parallelism, dist.get_world_size())
    model = parallelize_llama(
        model, parallel_dims=dims, training=TrainingConfig(), parallelism=parallelism,
        compile_config=CompileConfig(), ac_config=None, dump_folder="",
    )
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    optimizers = default_adamw(lr=1e-3).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=10
    )
    return model, optimizers, schedulers


def _train(model, optimizers, schedulers, step: int) -> None:
    """One optimizer + scheduler step with a deterministic gradient (no CPU flex backward)."""
    for i, p in enumerate(model.parameters()):
        p.grad = torch.sin(p.detach() * (step + i + 1))
    optimizers.step()
    optimizers.zero_grad()
    schedulers.step()


def _manager(model, optimizers, schedulers, folder: str, async_mode: str, options: dict):
    from torch_ucp.integrations.torchtitan import UCPCheckpointManager

    config = UCPCheckpointManager.Config(
        enable=True, folder=folder, interval=1, async_mode=async_mode, keep_latest_k=0,
        initial_load_model_only=False, storage_options=options,
    )
    return config.build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={}, sd_adapter=None, base_folder="",
    )


def _full(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            out[k] = v.full_tensor().clone()
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        elif isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _full(v).items()})
        else:
            out[k] = v
    return out


def _reference(model, optimizers, schedulers) -> dict[str, Any]:
    return {
        "model": _full(model.state_dict()),
        "optim": _full(optimizers.state_dict()),
        "lr": _full(schedulers.state_dict()),
    }


def _save_on_four(base: str, s3_url: str, s3_options: dict) -> dict[str, Any]:
    model, optimizers, schedulers = _build(dp_shard=2, tp=2)
    for step in range(SAVED_STEP):
        _train(model, optimizers, schedulers, step)
    placements = {str(p.placements) for p in model.parameters()}
    for name, (async_mode, remote) in MODES.items():
        reference = _reference(model, optimizers, schedulers)  # the state at this save
        if dist.get_rank() == 0:
            torch.save(reference, os.path.join(base, f"reference-{name}.pt"))
        folder = f"{s3_url}/{name}" if remote else os.path.join(base, name)
        manager = _manager(model, optimizers, schedulers, folder, async_mode,
                           s3_options if remote else {})
        assert manager.save(SAVED_STEP)
        _train(model, optimizers, schedulers, 10 + len(name))  # training goes on meanwhile
        manager.maybe_wait_for_staging()
        manager.maybe_wait_for_saving()
        manager.close()
    return {"placements": sorted(placements), "keys": len(reference["optim"])}


def _load_on_two(base: str, s3_url: str, s3_options: dict) -> dict[str, list[str]]:
    model, optimizers, schedulers = _build(dp_shard=2, tp=1)
    _train(model, optimizers, schedulers, 5)  # different values everywhere, optimizer state exists
    problems: dict[str, list[str]] = {}
    for name, (async_mode, remote) in MODES.items():
        expected = torch.load(os.path.join(base, f"reference-{name}.pt"), weights_only=True)
        folder = f"{s3_url}/{name}" if remote else os.path.join(base, name)
        manager = _manager(model, optimizers, schedulers, folder, async_mode,
                           s3_options if remote else {})
        found = manager._find_load_step()
        assert manager.load()  # the latest step: what a restarted TorchTitan job does
        manager.close()
        got = _reference(model, optimizers, schedulers)
        bad = [] if found == SAVED_STEP else [f"latest step found {found}"]
        for part in ("model", "optim", "lr"):
            if sorted(got[part]) != sorted(expected[part]):
                bad.append(f"{part}: keys differ {sorted(set(got[part]) ^ set(expected[part]))[:5]}")
            for k, e in expected[part].items():
                g = got[part].get(k)
                same = (torch.equal(g, e) and g.dtype == e.dtype) if isinstance(e, torch.Tensor) else g == e
                if not same:
                    bad.append(f"{part}.{k} differs")
        problems[name] = bad
        _train(model, optimizers, schedulers, 6)  # so the next mode's load must overwrite again
    return problems


def test_torchtitan_llama3_saved_on_four_ranks_loads_bit_exact_on_two(tmp_path, s3_bucket):
    s3_url, options = s3_bucket
    base = str(tmp_path)
    saved = run_distributed(_save_on_four, 4, base, s3_url, options)
    assert any("_StridedShard" in p for p in saved[0]["placements"]), saved[0]  # FSDP2 x TP
    for name, (_, remote) in MODES.items():
        url = f"{s3_url}/{name}/step-{SAVED_STEP}" if remote else os.path.join(base, name, f"step-{SAVED_STEP}")
        ckpt = open_checkpoint(url, **(options if remote else {}))  # a torch_ucp checkpoint
        assert any(k.startswith("optimizer.state.") for k in ckpt.keys()), name
    problems = run_distributed(_load_on_two, 2, base, s3_url, options)
    for rank, per_mode in enumerate(problems):
        for name, bad in per_mode.items():
            assert not bad, f"rank {rank}, {name}: {bad[:10]}"
