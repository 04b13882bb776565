"""Random single-bit flips in data objects never load silently with the default ``verify``.

A checkpoint saved by 4 ranks (``Shard(0)``) holds tensors of several shapes and dtypes (rows
wider and narrower than a checksum block's width, 1-D, 3-D) and values. Each trial flips one
random bit of one data object of a fresh copy, then reads it one way:

- ``whole``: every key whole with ``open_checkpoint`` (and a ``dcp.load`` in one process);
- ``sliced``: a random box of the tensor holding the flipped bit, containing the flipped
  element most of the time (then the read must fail), and of every other tensor;
- ``resharded``: ``dcp.load`` into ``Shard(1)`` DTensors on 2 ranks (half of every row).

Every read either fails with ``CorruptCheckpointError`` or returns bit-exact values (a flip in
bytes the read does not deliver, e.g. alignment padding or another slice); none returns a
wrong value. The counts are printed (``pytest -s``).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torch_ucp import (
    CorruptCheckpointError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    open_checkpoint,
)
from torch_ucp.demo.launch import run_distributed

TRIALS = {"whole": 100, "sliced": 120, "resharded": 100}
VALUES = {"step": 123456, "betas": (0.9, 0.999), "blob": bytes(range(256)) * 4}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "wide": torch.randn(128, 1536, generator=g),  # rows of 6 KiB: 2 KiB x 32-row blocks
        "narrow": torch.randn(256, 40, generator=g).to(torch.bfloat16),  # 80-byte rows
        "flat": torch.randint(-(2**40), 2**40, (20000,), generator=g),  # 1-D: flat blocks
        "cube": (torch.randn(8, 64, 96, generator=g) * 100).to(torch.float16),
    }


def _save(path: str) -> None:
    mesh = init_device_mesh("cpu", (4,))
    state = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in _tensors().items()}
    dcp.save({"model": state, **VALUES}, storage_writer=UCPWriter(path), planner=UCPSavePlanner())


def _objects(path: str) -> list[tuple[str, int]]:
    """The data objects (the fragment indexes are metadata: tests/test_metadata_integrity.py)."""
    ckpt = open_checkpoint(path, verify=False)
    names = {f.data.object for fqn in ckpt.metadata.tensors for f in ckpt.fragments(fqn)}
    names |= {v.data.object for v in ckpt.metadata.values.values()}
    return [(n, os.path.getsize(os.path.join(path, n))) for n in sorted(names)]


def _flip(base: str, path: str, rng: random.Random) -> tuple[str, int]:
    """Copy ``base`` to ``path`` and flip one random bit; returns (object, byte offset)."""
    shutil.copytree(base, path)
    objects = _objects(path)
    total = sum(size for _, size in objects)
    at = rng.randrange(total)
    k = 0
    while at >= objects[k][1]:
        at -= objects[k][1]
        k += 1
    name = objects[k][0]
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ (1 << rng.randrange(8))]))
    return name, at


def _flipped_element(path: str, obj: str, at: int) -> tuple[str, tuple[int, ...]] | None:
    """The tensor and global index of the element holding the flipped byte (``None``: not a
    tensor's byte)."""
    ckpt = open_checkpoint(path, verify=False)
    for fqn, t in ckpt.metadata.tensors.items():
        for f in ckpt.fragments(fqn):
            if f.data.object == obj and f.data.byte_offset <= at < f.data.byte_offset + f.data.byte_length:
                flat = (at - f.data.byte_offset) // t.dtype.itemsize
                local = []
                for n in reversed(f.lengths):
                    local.append(flat % n)
                    flat //= n
                return fqn, tuple(o + i for o, i in zip(f.offsets, reversed(local)))
    return None


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def _read_whole(path: str) -> bool:
    """True: everything bit-exact. Raises CorruptCheckpointError when detected."""
    ckpt = open_checkpoint(path)
    ok = all(_equal(ckpt.read(f"model.{k}"), v) for k, v in _tensors().items())
    ok &= all(ckpt.read(k) == v for k, v in VALUES.items())
    state = {"model": {k: torch.zeros_like(v) for k, v in _tensors().items()}, "step": 0,
             "betas": None, "blob": b""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.load(state, storage_reader=UCPReader(path), planner=UCPLoadPlanner(), no_dist=True)
        except CheckpointException as e:
            raise next(iter(e.failures.values()))[0] from None
    ok &= all(_equal(state["model"][k], v) for k, v in _tensors().items())
    return ok and all(state[k] == v for k, v in VALUES.items())


def _random_box(shape, rng: random.Random, containing: tuple[int, ...] | None):
    index = []
    for d, n in enumerate(shape):
        if containing is not None:
            lo = rng.randint(0, containing[d])
            hi = rng.randint(containing[d] + 1, n)
        else:
            lo = rng.randrange(n)
            hi = rng.randint(lo + 1, n)
        index.append(slice(lo, hi))
    return tuple(index)


def _read_sliced(path: str, hit: tuple[str, tuple[int, ...]] | None, rng: random.Random) -> tuple[bool, bool]:
    """(bit-exact, the read covered the flipped element)."""
    ckpt = open_checkpoint(path)
    ok, covered = True, False
    for k, v in _tensors().items():
        fqn = f"model.{k}"
        mine = hit is not None and hit[0] == fqn
        contain = hit[1] if mine and rng.random() < 0.75 else None
        index = _random_box(v.shape, rng, contain)
        covered |= contain is not None
        ok &= _equal(ckpt.read(fqn, index), v[index])
    return ok, covered


def _load_resharded(paths: list[str]) -> list[str]:
    """Rank function: load each checkpoint into Shard(1) DTensors; "ok", "wrong" or an error."""
    mesh = init_device_mesh("cpu", (2,))
    results = []
    for path in paths:
        state = {"model": {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(1 if v.dim() > 1 else 0)],
                                                src_data_rank=None)
                           for k, v in _tensors().items()},
                 "step": 0, "betas": None, "blob": b""}
        try:
            dcp.load(state, storage_reader=UCPReader(path), planner=UCPLoadPlanner())
        except CheckpointException as e:
            errors = [exc for exc, _ in e.failures.values()]
            results.append("detected" if all(isinstance(x, CorruptCheckpointError) for x in errors)
                           else f"error: {errors!r}")
            continue
        ok = all(_equal(state["model"][k].full_tensor(), v) for k, v in _tensors().items())
        ok &= all(state[k] == v for k, v in VALUES.items())
        results.append("ok" if ok else "wrong")
    return results


def test_random_bit_flips_never_load_silently(tmp_path):
    base = str(tmp_path / "base")
    run_distributed(_save, 4, base)
    assert _read_whole(base)
    rng = random.Random(2024)
    counts = {mode: {"tried": 0, "detected": 0, "harmless": 0, "silent": 0} for mode in TRIALS}

    def record(mode: str, outcome: str) -> None:
        counts[mode]["tried"] += 1
        counts[mode][outcome] += 1

    for i in range(TRIALS["whole"]):
        path = str(tmp_path / f"whole-{i}")
        _flip(base, path, rng)
        try:
            record("whole", "harmless" if _read_whole(path) else "silent")
        except CorruptCheckpointError:
            record("whole", "detected")
        shutil.rmtree(path)
    for i in range(TRIALS["sliced"]):
        path = str(tmp_path / f"sliced-{i}")
        obj, at = _flip(base, path, rng)
        hit = _flipped_element(path, obj, at)
        try:
            ok, covered = _read_sliced(path, hit, rng)
            assert not covered, f"a read covering the flipped element {hit} succeeded"
            record("sliced", "harmless" if ok else "silent")
        except CorruptCheckpointError:
            record("sliced", "detected")
        shutil.rmtree(path)
    paths = []
    for i in range(TRIALS["resharded"]):
        path = str(tmp_path / f"reshard-{i}")
        _flip(base, path, rng)
        paths.append(path)
    results = run_distributed(_load_resharded, 2, paths)
    assert results[0] == results[1]  # every rank saw the same outcome
    for r in results[0]:
        assert r in ("ok", "wrong", "detected"), r
        record("resharded", {"ok": "harmless", "wrong": "silent", "detected": "detected"}[r])
    print("bit flips:", counts)
    for mode, c in counts.items():
        assert c["tried"] == TRIALS[mode]
        assert c["silent"] == 0, (mode, c)
        # the flips did hit delivered bytes (sliced reads skip some of them on purpose)
        assert c["detected"] >= (0.6 if mode == "sliced" else 0.9) * c["tried"], (mode, c)
    assert math.isclose(sum(c["tried"] for c in counts.values()), sum(TRIALS.values()))
