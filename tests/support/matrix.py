"""The reshard matrix: save logical tensors on one layout, load them on another, compare.

Every tensor's reference is generated from its name, so any process can rebuild it. A layout
maps every tensor to placements on a mesh; rank functions here run under
:func:`torch_ucp.demo.launch.run_distributed`.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter

# name -> (shape, dtype): even and uneven dims, fewer rows than ranks, 1-D, ints, bools, bf16
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "w_even": ((16, 12), torch.float32),
    "w_odd": ((13, 7), torch.float32),
    "emb": ((10, 6), torch.bfloat16),
    "vec": ((11,), torch.float32),
    "ids": ((9, 5), torch.int64),
    "mask": ((6, 4), torch.bool),
    "tiny": ((3, 2), torch.float16),
}

# layout name -> (world size, mesh shape, placements); Shard dims wrap for 1-D tensors
LAYOUTS: dict[str, tuple[int, tuple[int, ...], tuple[Any, ...]]] = {
    "ws1-plain": (1, (), ()),
    "ws2-shard0": (2, (2,), (Shard(0),)),
    "ws2-shard1": (2, (2,), (Shard(1),)),
    "ws2-replicate": (2, (2,), (Replicate(),)),
    "ws4-shard0": (4, (4,), (Shard(0),)),
    "ws4-shard1": (4, (4,), (Shard(1),)),
    "ws4-2d": (4, (2, 2), (Shard(0), Shard(1))),
    "ws4-2d-swapped": (4, (2, 2), (Shard(1), Shard(0))),
    "ws4-fsdp-tp-strided": (4, (2, 2), (_StridedShard(0, split_factor=2), Shard(0))),
    "ws4-hsdp": (4, (2, 2), (Replicate(), Shard(0))),
}


def reference(name: str) -> torch.Tensor:
    shape, dtype = TENSORS[name]
    seed = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


def _placements(placements: tuple[Any, ...], ndim: int) -> list[Any]:
    out = []
    for p in placements:
        if isinstance(p, _StridedShard):
            out.append(_StridedShard(p.dim % ndim, split_factor=p.split_factor))
        elif isinstance(p, Shard):
            out.append(Shard(p.dim % ndim))
        else:
            out.append(p)
    return out


def _mesh(layout: str):
    from torch.distributed.device_mesh import init_device_mesh

    _, mesh_shape, _ = LAYOUTS[layout]
    return init_device_mesh("cpu", mesh_shape) if mesh_shape else None


def layout_tensor(layout: str, full: torch.Tensor, mesh) -> torch.Tensor:
    _, _, placements = LAYOUTS[layout]
    if mesh is None:
        return full.clone()
    # every rank holds the full reference: split locally (uneven _StridedShard needs it)
    return distribute_tensor(full, mesh, _placements(placements, full.ndim), src_data_rank=None)


class Counter(Stateful):
    """A Stateful object with a tensor and plain values (like a dataloader's state)."""

    def __init__(self, n: int, history: torch.Tensor) -> None:
        self.n = n
        self.history = history

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "history": self.history, "label": f"counter-{self.n}"}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]
        self.history = sd["history"]
        self.label = sd["label"]


EXTRA = {"step": 7, "names": ["a", "b"], "blob": b"\x00\xffucp", "cfg": {"lr": 0.5, "n": [1, 2]}}


def state_for(layout: str, mesh, fill: bool) -> dict[str, Any]:
    tensors = {
        name: layout_tensor(
            layout, reference(name) if fill else torch.zeros(shape, dtype=dtype), mesh
        )
        for name, (shape, dtype) in TENSORS.items()
    }
    extra = EXTRA if fill else {"step": 0, "names": [], "blob": b"", "cfg": {"lr": 0.0, "n": []}}
    return {"model": tensors, "extra": dict(extra), "counter": Counter(5, torch.arange(5, dtype=torch.int32))
            if fill else Counter(0, torch.zeros(5, dtype=torch.int32))}


def save_layouts(base: str, layouts: list[str], storage_options: dict[str, Any]) -> dict[str, int]:
    """Rank function (or single process): save every layout's checkpoint under ``base``."""
    written = {}
    for layout in layouts:
        mesh = _mesh(layout)
        writer = UCPWriter(posixpath.join(base, layout), **storage_options)
        dcp.save(
            state_for(layout, mesh, fill=True),
            storage_writer=writer,
            planner=UCPSavePlanner(),
            no_dist=mesh is None,
        )
        written[layout] = writer.bytes_written
    return written


def check_state(state: dict[str, Any]) -> list[str]:
    problems = []
    for name, t in state["model"].items():
        expected = reference(name)
        got = t.full_tensor() if isinstance(t, DTensor) else t
        if got.dtype != expected.dtype or not torch.equal(got, expected):
            problems.append(f"{name}: values differ")
        if isinstance(t, DTensor):
            # the local shard is exactly what distribute_tensor puts on this rank
            local = distribute_tensor(
                expected, t.device_mesh, t.placements, src_data_rank=None
            ).to_local()
            if not torch.equal(t.to_local(), local):
                problems.append(f"{name}: local shard differs")
    if state["extra"] != EXTRA:
        problems.append(f"extra: {state['extra']!r}")
    counter = state["counter"]
    if counter.n != 5 or not torch.equal(counter.history, torch.arange(5, dtype=torch.int32)):
        problems.append("counter: not restored")
    if getattr(counter, "label", None) != "counter-5":
        problems.append("counter label: not restored")
    return problems


def load_layouts(
    base: str, saved: list[str], targets: list[str], storage_options: dict[str, Any]
) -> dict[str, Any]:
    """Rank function (or single process): load every saved checkpoint into every target layout."""
    results: dict[str, Any] = {}
    for target in targets:
        mesh = _mesh(target)
        for source in saved:
            state = state_for(target, mesh, fill=False)
            reader = UCPReader(posixpath.join(base, source), **storage_options)
            try:
                dcp.load(
                    state, storage_reader=reader, planner=UCPLoadPlanner(), no_dist=mesh is None
                )
                problems = check_state(state)
            except (Exception, CheckpointException) as e:  # reported per case by the test
                problems = [f"{type(e).__name__}: {e}"]
            results[f"{source}->{target}"] = {
                "problems": problems,
                "bytes_read": reader.stats.bytes_read,
                "bytes_needed": reader.stats.bytes_needed,
            }
    return results


def world_size(layout: str) -> int:
    return LAYOUTS[layout][0]
