"""`torch-ucp demo`: train on FSDP2 x TP (2x2), save, reload on three other layouts, verify.

1. 4 CPU processes (gloo) train a small Llama-style model with FSDP2 + tensor parallel on a
   2x2 mesh for a few AdamW steps and save model + optimizer state with
   ``dcp.save(state, storage_writer=UCPWriter(dir), planner=UCPSavePlanner())``.
2. The checkpoint is loaded into (a) 2 processes FSDP-only, (b) 4 processes TP=4, (c) one
   process without torch.distributed, and every model and optimizer tensor is compared
   bit-exactly with the reference ``full_tensor()`` taken at save time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

from torch_ucp import _compat
from torch_ucp.demo.launch import run_distributed
from torch_ucp.demo.model import ModelConfig, build, train_step


def _flatten(state: dict[str, Any]) -> dict[str, Any]:
    """DCP's own flattening, so keys match the checkpoint's FQNs."""
    return _compat.flatten_state_dict(state)[0]


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value


def _quiet() -> None:
    """Silence torch warnings that say nothing about checkpointing (demo output stays a table)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def _mesh(layout: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "fsdp+tp":
        return init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp"))
    name = "dp" if layout == "fsdp" else "tp"
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=(name,))


def _train_state(model, optim, step: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd, "train": {"step": step}}


def train_and_save(cfg: dict, ckpt: str, reference: str, steps: int) -> dict[str, Any]:
    """Rank function: train on FSDP2 x TP, save, write the reference (rank 0)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from torch_ucp import UCPSavePlanner, UCPWriter

    _quiet()
    config = ModelConfig(**cfg)
    mesh = _mesh("fsdp+tp", dist.get_world_size())
    model = build(config, mesh, "fsdp+tp")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [train_step(model, optim, config, s) for s in range(steps)]
    state = _train_state(model, optim, steps)
    writer = UCPWriter(ckpt)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=writer, planner=UCPSavePlanner())
    seconds = time.perf_counter() - t0
    full = {k: _full(v) for k, v in _flatten(state).items()}
    if dist.get_rank() == 0:
        torch.save(full, reference)
    return {"seconds": seconds, "bytes_written": writer.bytes_written, "losses": losses}


def _compare(actual: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    problems = []
    for key, expected in reference.items():
        if key not in actual:
            problems.append(f"{key}: not loaded")
            continue
        got = _full(actual[key])
        if isinstance(expected, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.dtype != expected.dtype:
                problems.append(f"{key}: wrong type/dtype")
            elif got.shape != expected.shape or not torch.equal(got, expected):
                problems.append(f"{key}: values differ")
        elif got != expected:
            problems.append(f"{key}: {got!r} != {expected!r}")
    return problems


def load_and_verify(cfg: dict, ckpt: str, reference: str, layout: str) -> dict[str, Any]:
    """Rank function: build ``layout``, load the checkpoint into it, compare with the reference."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from torch_ucp import UCPLoadPlanner, UCPReader

    _quiet()
    config = ModelConfig(**cfg)
    mesh = _mesh(layout, dist.get_world_size())
    model = build(config, mesh, layout)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = _train_state(model, optim, 0)
    reader = UCPReader(ckpt)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(state, storage_reader=reader, planner=UCPLoadPlanner())
    seconds = time.perf_counter() - t0
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after = _flatten(_train_state(model, optim, state["train"]["step"]))
    problems = _compare(after, torch.load(reference, weights_only=True))
    return {"seconds": seconds, "bytes_read": reader.stats.bytes_read, "problems": problems}


def load_single_process(cfg: dict, ckpt: str, reference: str) -> dict[str, Any]:
    """Load without torch.distributed: model via ``dcp.load`` (no process group), then every
    tensor (optimizer state included) via :func:`torch_ucp.open_checkpoint`."""
    import torch.distributed.checkpoint as dcp

    from torch_ucp import UCPLoadPlanner, UCPReader, open_checkpoint

    _quiet()
    config = ModelConfig(**cfg)
    model = build(config, None, "plain")
    reader = UCPReader(ckpt)
    t0 = time.perf_counter()
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=reader, planner=UCPLoadPlanner(allow_partial_load=True), no_dist=True)
    model.load_state_dict(state["model"])
    ckpt_view = open_checkpoint(ckpt)
    loaded = {f"model.{k}": v for k, v in model.state_dict().items()}
    for key in ckpt_view.keys():
        if not key.startswith("model."):
            loaded[key] = ckpt_view.read(key)
    seconds = time.perf_counter() - t0
    problems = _compare(loaded, torch.load(reference, weights_only=True))
    read = reader.stats.bytes_read + ckpt_view.stats.bytes_read
    return {"seconds": seconds, "bytes_read": read, "problems": problems}


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run_demo(out_dir: str, cfg: ModelConfig, steps: int, keep: bool = False) -> int:
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, f"step-{steps}")
    reference = os.path.join(out_dir, "reference.pt")
    if os.path.exists(ckpt):
        print(f"torch_ucp demo: deleting the checkpoint of an earlier run at {ckpt}", flush=True)
        shutil.rmtree(ckpt)
    c = dataclasses.asdict(cfg)
    rows = []
    print(f"torch_ucp demo: checkpoint at {ckpt}", flush=True)
    print("  training 4 processes, FSDP2 x TP on a 2x2 mesh ...", flush=True)
    saved = run_distributed(train_and_save, 4, c, ckpt, reference, steps)
    rows.append(
        ("save  FSDP2 2 x TP 2 (4 procs)", max(r["seconds"] for r in saved),
         sum(r["bytes_written"] for r in saved), 0, [])
    )
    for label, layout, world in (
        ("load  FSDP2 only (2 procs)", "fsdp", 2),
        ("load  TP=4 (4 procs)", "tp", 4),
    ):
        print(f"  {label.strip()} ...", flush=True)
        res = run_distributed(load_and_verify, world, c, ckpt, reference, layout)
        rows.append(
            (label, max(r["seconds"] for r in res), 0, sum(r["bytes_read"] for r in res),
             sorted({p for r in res for p in r["problems"]}))
        )
    print("  load  one process, no torch.distributed ...", flush=True)
    r = load_single_process(c, ckpt, reference)
    rows.append(("load  1 process, no process group", r["seconds"], 0, r["bytes_read"], r["problems"]))

    print()
    print(f"{'layout':<36} {'seconds':>8} {'written':>12} {'read':>12}  result")
    print("-" * 84)
    failed = False
    for label, seconds, written, read, problems in rows:
        status = "ok (bit-exact)" if not problems else f"MISMATCH ({len(problems)})"
        if label.startswith("save"):
            status = "saved"
        failed |= bool(problems)
        print(f"{label:<36} {seconds:>8.3f} {_fmt_bytes(written) if written else '-':>12} "
              f"{_fmt_bytes(read) if read else '-':>12}  {status}")
        for p in problems[:10]:
            print(f"    {p}")
    ref = torch.load(reference, weights_only=True)
    n = sum(isinstance(v, torch.Tensor) for v in ref.values())
    print(f"\n{n} model and optimizer tensors compared on every layout; final loss "
          f"{saved[0]['losses'][-1]:.4f}")
    if not keep:
        os.remove(reference)
    return 1 if failed else 0


def _say_what_is_kept(ckpt: str, kept: bool) -> None:
    if kept:
        print(f"\nkept the checkpoint at {ckpt}: try torch-ucp inspect {ckpt}")
    else:
        print(f"\ndeleted the checkpoint at {ckpt} (pass --keep, or --out DIR, to keep it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps before saving")
    parser.add_argument("--dim", type=int, default=ModelConfig.dim, help="model width")
    parser.add_argument("--layers", type=int, default=ModelConfig.n_layers)
    parser.add_argument("--vocab", type=int, default=ModelConfig.vocab_size)
    parser.add_argument("--ffn-dim", type=int, default=ModelConfig.ffn_dim)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the checkpoint and the reference tensors (without --out, the temporary "
        "folder holding them is deleted; with --out, the checkpoint stays and only the "
        "reference is deleted)",
    )


def main(args: argparse.Namespace) -> int:
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, ffn_dim=args.ffn_dim)
    if args.out is not None:
        code = run_demo(args.out, cfg, args.steps, keep=args.keep)
        _say_what_is_kept(os.path.join(args.out, f"step-{args.steps}"), kept=True)
        return code
    out = tempfile.mkdtemp(prefix="torch-ucp-demo-")
    try:
        code = run_demo(out, cfg, args.steps, keep=args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    _say_what_is_kept(os.path.join(out, f"step-{args.steps}"), kept=args.keep)
    return code


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))
