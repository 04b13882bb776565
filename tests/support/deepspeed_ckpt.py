"""Make real DeepSpeed universal checkpoints (and DeepSpeed's own reference values) for tests.

``make_universal_checkpoint(out_dir, zero_stage)`` trains :class:`TinyModel` for a few AdamW
steps with DeepSpeed ZeRO on CPU over 2 gloo processes, saves a DeepSpeed checkpoint, converts
it with DeepSpeed's ``ds_to_universal`` and dumps DeepSpeed's own view of the full fp32
parameters and Adam moments (``deepspeed.utils.safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``) and the Adam step into ``reference.pt``.

The training runs in a subprocess (``python -m torch.distributed.run --standalone
--nproc_per_node 2 <this file> --worker ...``) so DeepSpeed is never imported into the
caller (tests load the result without DeepSpeed). Results are cached in ``out_dir``: a second
call with the same arguments returns at once.

DeepSpeed is installed for tests with::

    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip install --no-build-isolation --no-deps deepspeed==0.19.8
    pip install einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic tqdm

Run by hand: ``python tests/support/deepspeed_ckpt.py OUT_DIR --stage 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

VOCAB = 37
DIM = 13
HIDDEN = 21
OUT = 7
SEQ = 5
MICRO_BATCH = 3
LR = 1e-2
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.95)
EPS = 1e-8

DONE_FILE = "done.json"
REFERENCE_FILE = "reference.pt"


class TinyModel(nn.Module):
    """Embedding -> 2 Linear -> LayerNorm -> head; odd dims so shards are uneven (~2.5k params)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, OUT, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        h = torch.relu(self.layers[0](h))
        h = self.layers[1](h)
        h = self.norm(h)
        return self.head(h)


def ds_config(zero_stage: int) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # Partition even tiny parameters so the ZeRO-3 layout is exercised fully.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def _batch(step: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + step * 101 + rank)
    idx = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
    target = torch.randint(0, OUT, (MICRO_BATCH, SEQ), generator=g)
    return idx, target


def _worker(out_dir: Path, zero_stage: int, steps: int, seed: int) -> None:
    """Body of each of the 2 training processes (run under torch.distributed.run)."""
    import importlib

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # The CPU accelerator JIT-compiles a shared-memory allreduce op (~45 s with g++ on a fresh
    # machine). Plain gloo collectives are enough for 2 tiny processes, so skip building it.
    # (``deepspeed.comm.torch`` as an attribute is the torch package itself: go by module name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(seed)
    model = TinyModel()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(zero_stage)
    )
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        idx, target = _batch(step, rank, seed)
        logits = engine(idx)
        loss = loss_fn(logits.reshape(-1, OUT), target.reshape(-1))
        engine.backward(loss)
        engine.step()

    # DeepSpeed's own view of the full fp32 master weights and Adam moments. These helpers
    # are collectives under ZeRO-3, so every rank calls them; rank 0 writes the file.
    reference: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        reference[f"{name}.fp32"] = safe_get_full_fp32_param(param).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            reference[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().clone()
    base_state = engine.optimizer.optimizer.state
    step_values = {float(s["step"]) for s in base_state.values() if "step" in s}
    assert len(step_values) == 1, f"unexpected Adam step values {step_values}"
    reference["step"] = torch.tensor(step_values.pop(), dtype=torch.float32)

    ckpt_dir = out_dir / "ds"
    tag = f"global_step{steps}"
    client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:
        torch.save(reference, out_dir / REFERENCE_FILE)
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        universal_dir = ckpt_dir / f"{tag}_universal"
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(ckpt_dir / tag),
                output_folder=str(universal_dir),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
        info = {
            "zero_stage": zero_stage,
            "steps": steps,
            "seed": seed,
            "step": float(reference["step"]),
            "checkpoint_dir": str(ckpt_dir / tag),
            "universal_dir": str(universal_dir),
            "reference": str(out_dir / REFERENCE_FILE),
            "param_names": [n for n, _ in engine.module.named_parameters()],
        }
        (out_dir / DONE_FILE).write_text(json.dumps(info, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def make_universal_checkpoint(
    out_dir: str | os.PathLike, zero_stage: int, steps: int = 3, seed: int = 0
) -> dict:
    """Train, save, convert; return a dict describing the result.

    Keys: ``universal_dir`` (the ``ds_to_universal`` output folder), ``checkpoint_dir`` (the
    original DeepSpeed checkpoint), ``reference`` (a ``torch.save`` file of plain tensors
    ``<name>.fp32``, ``<name>.exp_avg``, ``<name>.exp_avg_sq`` and ``step``), ``step``,
    ``param_names``, ``zero_stage``, ``steps``, ``seed`` and ``seconds`` (time taken).
    Cached: if ``out_dir`` already holds a finished run with the same arguments it is returned.
    """
    out = Path(out_dir)
    done = out / DONE_FILE
    if done.exists():
        info = json.loads(done.read_text())
        if (info["zero_stage"], info["steps"], info["seed"]) == (zero_stage, steps, seed):
            info.setdefault("seconds", 0.0)
            return info
        raise ValueError(f"{out} already holds a different DeepSpeed run: {info}")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "torch_ucp_test_extensions"),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.abspath(__file__),
        "--worker",
        str(out),
        "--stage",
        str(zero_stage),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    (out / "log.txt").write_text(proc.stdout)
    if proc.returncode != 0 or not done.exists():
        raise RuntimeError(
            f"DeepSpeed run failed (exit {proc.returncode}); last output:\n{proc.stdout[-4000:]}"
        )
    info = json.loads(done.read_text())
    info["seconds"] = time.perf_counter() - start
    return info


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from torch_ucp.demo.launch import exit_rank

        _worker(Path(args.out_dir), args.stage, args.steps, args.seed)
        # past interpreter finalization, gloo worker threads still alive abort the process
        # (see torch_ucp.demo.launch): leave without it, as run_distributed's ranks do
        exit_rank(0)
    else:
        info = make_universal_checkpoint(args.out_dir, args.stage, args.steps, args.seed)
        print(json.dumps(info, indent=2))


if __name__ == "__main__":
    _main()
