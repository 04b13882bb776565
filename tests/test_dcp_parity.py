"""PyTorch's own DCP test cases, run against torch_ucp (UCPWriter / UCPReader and the planners).

Written here after the cases of ``test/distributed/checkpoint`` in PyTorch 2.13 (not copied):

- ``test_file_system_checkpoint_cpu.py``: ShardedTensor save and load, row-wise <-> column-wise
  reshards, different shard plans (``ChunkShardingSpec`` with a rank holding two shards,
  ``EnumerableShardingSpec``), ShardedTensor <-> Tensor; values and ``Stateful`` objects;
- ``test_dtensor_resharding.py``: 1-D and 2-D meshes, placement and mesh changes, uneven and
  empty shards;
- ``test_nested_dict.py`` / ``test_traverse.py``: nested dicts and lists of tensors and values;
- ``test_save_load_api.py`` / ``test_file_system_checkpoint.py``: overwrite semantics, partial
  loads (``allow_partial_load``), ``_load_state_dict_from_keys``;
- ``test_async_process_executor.py``: ``dcp.async_save`` in process mode;
- every dtype torch 2.13 can store, bit-exact.

Real gloo processes (2 and 4 ranks), each running many cases (one process group per world
size); every comparison is bit-exact (the bytes of the tensors). The stock entry points that
build their own reader from a path, the ``FileSystemWriter`` options and the dtype edge cases
are checked in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import torch_ucp
from tests.support.dcp_io import load_plain, save_plain
from torch_ucp import (
    CheckpointExistsError,
    LoadPlanError,
    PatternError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    UnsupportedFormatError,
    _compat,
    rank_error,
)
from torch_ucp.demo.launch import run_distributed
from torch_ucp.metadata.dtypes import dtype_names, name_to_dtype
from torch_ucp.patterns import PaddedParam
from torch_ucp.storage.reader import load_metadata
from torch_ucp.storage.store import open_store

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v1")


# -- references and bit-exact comparison ------------------------------------------------------
def reference(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A tensor every rank can rebuild: random bytes, so every bit pattern of the dtype occurs
    (NaNs, -0.0, subnormals; packed pairs) and a bit-exact comparison means something."""
    n = torch.empty(shape, dtype=dtype).nbytes
    g = torch.Generator().manual_seed(1000 + seed)
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def _box(t: torch.Tensor, offsets, sizes) -> torch.Tensor:
    return t[tuple(slice(int(o), int(o) + int(n)) for o, n in zip(offsets, sizes))]


# -- ShardedTensor helpers --------------------------------------------------------------------
def _specs() -> dict[str, Any]:
    """Shard plans of a [10, 20] tensor on 2 ranks, as in PyTorch's reshard-on-load tests."""
    from torch.distributed._shard.sharding_spec import (
        ChunkShardingSpec,
        EnumerableShardingSpec,
        ShardMetadata,
    )

    def shard(offsets, sizes, rank):
        return ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=f"rank:{rank}/cpu")

    return {
        "rowwise": ChunkShardingSpec(dim=0, placements=["rank:0/cpu", "rank:1/cpu"]),
        "colwise": ChunkShardingSpec(dim=1, placements=["rank:0/cpu", "rank:1/cpu"]),
        "two_per_rank": ChunkShardingSpec(dim=0, placements=["rank:0/cpu", "rank:1/cpu", "rank:1/cpu", "rank:0/cpu"]),
        "enumerable": EnumerableShardingSpec([
            shard([0, 0], [2, 20], 0), shard([2, 0], [1, 20], 1), shard([3, 0], [3, 20], 0),
            shard([6, 0], [3, 20], 1), shard([9, 0], [1, 20], 0),
        ]),
        "enumerable_uneven": EnumerableShardingSpec([shard([0, 0], [8, 20], 1), shard([8, 0], [2, 20], 0)]),
        "blocks": EnumerableShardingSpec([
            shard([0, 0], [5, 12], 0), shard([0, 12], [5, 8], 1), shard([5, 0], [5, 12], 1), shard([5, 12], [5, 8], 0),
        ]),
    }


def make_st(spec: Any, full: torch.Tensor | None, shape=(10, 20), dtype=torch.float32) -> Any:
    """A ShardedTensor of ``spec``, its local shards filled from ``full`` (zeros if ``None``)."""
    from torch.distributed._shard import sharded_tensor

    st = sharded_tensor.zeros(spec, *shape, dtype=dtype, init_rrefs=False)
    if full is not None:
        for s in st.local_shards():
            s.tensor.copy_(_box(full, s.metadata.shard_offsets, s.metadata.shard_sizes))
    return st


def st_problems(name: str, st: Any, full: torch.Tensor) -> list[str]:
    return [
        f"{name}: shard at {list(s.metadata.shard_offsets)} differs"
        for s in st.local_shards()
        if not same_bits(s.tensor, _box(full, s.metadata.shard_offsets, s.metadata.shard_sizes))
    ]


def dt_problems(name: str, t: Any, full: torch.Tensor) -> list[str]:
    """A DTensor target against the reference: its full tensor and its local shard."""
    problems = []
    if isinstance(t, DTensor):
        if not same_bits(t.full_tensor(), full):
            problems.append(f"{name}: full tensor differs")
        local = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
        if not same_bits(t.to_local(), local):
            problems.append(f"{name}: local shard differs")
    elif not same_bits(t, full):
        problems.append(f"{name}: differs")
    return problems


def _mesh(shape: tuple[int, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape)


def save(sd: dict[str, Any], path: str, **options: Any) -> Any:
    return dcp.save(sd, storage_writer=UCPWriter(path, **options), planner=UCPSavePlanner())


def load(sd: dict[str, Any], path: str, planner: Any = None) -> None:
    dcp.load(sd, storage_reader=UCPReader(path), planner=planner or UCPLoadPlanner())


def _error_of(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except CheckpointException as e:
        return rank_error(e) or e
    except Exception as e:  # noqa: BLE001 - returned to be checked
        return e
    return None


# -- cases on 2 ranks: ShardedTensor, stock planners, async process mode ---------------------
def case_st_rowwise_to_colwise(path: str) -> list[str]:
    specs, full, problems = _specs(), reference((10, 20)), []
    for src, dst in (("rowwise", "colwise"), ("colwise", "rowwise")):
        save({"st": make_st(specs[src], full)}, f"{path}/{src}")
        target = {"st": make_st(specs[dst], None)}
        load(target, f"{path}/{src}")
        problems += st_problems(f"{src}->{dst}", target["st"], full)
    return problems


def case_st_shard_plans(path: str) -> list[str]:
    """Every plan saved, loaded into every other plan (and into itself)."""
    specs, full, problems = _specs(), reference((10, 20), seed=1), []
    for src, spec in specs.items():
        save({"st": make_st(spec, full)}, f"{path}/{src}")
    for src in specs:
        for dst, spec in specs.items():
            target = {"st": make_st(spec, None)}
            load(target, f"{path}/{src}")
            problems += st_problems(f"{src}->{dst}", target["st"], full)
    return problems


def case_st_tensor_switch(path: str) -> list[str]:
    """ShardedTensor -> plain tensor on every rank, and plain tensor -> ShardedTensor."""
    specs, full, problems = _specs(), reference((10, 20), seed=2), []
    save({"st": make_st(specs["two_per_rank"], full)}, f"{path}/from_st")
    plain = {"st": torch.zeros(10, 20)}
    load(plain, f"{path}/from_st")
    problems += [] if same_bits(plain["st"], full) else ["st -> tensor differs"]
    save({"st": full.clone()}, f"{path}/from_tensor")
    for dst in ("colwise", "enumerable"):
        target = {"st": make_st(specs[dst], None)}
        load(target, f"{path}/from_tensor")
        problems += st_problems(f"tensor->{dst}", target["st"], full)
    return problems


def case_st_dtensor_switch(path: str) -> list[str]:
    specs, full, problems = _specs(), reference((10, 20), seed=3), []
    mesh = _mesh((2,))
    save({"w": make_st(specs["blocks"], full)}, f"{path}/from_st")
    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        target = {"w": distribute_tensor(torch.zeros(10, 20), mesh, placements, src_data_rank=None)}
        load(target, f"{path}/from_st")
        problems += dt_problems(f"st->{placements}", target["w"], full)
    save({"w": distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)}, f"{path}/from_dt")
    for dst in ("rowwise", "two_per_rank"):
        target = {"w": make_st(specs[dst], None)}
        load(target, f"{path}/from_dt")
        problems += st_problems(f"dtensor->{dst}", target["w"], full)
    return problems


def case_st_dtypes_and_nesting(path: str) -> list[str]:
    """ShardedTensors of other dtypes, nested in dicts and lists, beside values."""
    specs, problems = _specs(), []
    fulls = {n: reference((10, 20), name_to_dtype(n), seed=i) for i, n in enumerate(("bfloat16", "int64", "float8_e4m3fn"))}
    sd = {"model": {n: make_st(specs["colwise"], f, dtype=f.dtype) for n, f in fulls.items()}, "meta": [1, "a"]}
    save(sd, path)
    target = {"model": {n: make_st(specs["enumerable"], None, dtype=f.dtype) for n, f in fulls.items()}, "meta": [0, ""]}
    load(target, path)
    for n, f in fulls.items():
        problems += st_problems(n, target["model"][n], f)
    return problems + ([] if target["meta"] == [1, "a"] else [f"meta: {target['meta']!r}"])


def case_st_stock_planners(path: str) -> list[str]:
    """Stock planners on torch_ucp storage, and UCPSavePlanner on stock storage, with
    ShardedTensors on both sides."""
    specs, full, problems = _specs(), reference((10, 20), seed=4), []
    dcp.save({"st": make_st(specs["two_per_rank"], full)}, storage_writer=UCPWriter(f"{path}/stock_planner"),
             planner=DefaultSavePlanner())
    target = {"st": make_st(specs["colwise"], None)}
    dcp.load(target, storage_reader=UCPReader(f"{path}/stock_planner"), planner=DefaultLoadPlanner())
    problems += st_problems("DefaultSavePlanner+UCPWriter -> DefaultLoadPlanner+UCPReader", target["st"], full)
    target = {"st": make_st(specs["enumerable"], None)}
    load(target, f"{path}/stock_planner")
    problems += st_problems("DefaultSavePlanner+UCPWriter -> UCPLoadPlanner", target["st"], full)
    dcp.save({"st": make_st(specs["rowwise"], full)}, storage_writer=FileSystemWriter(f"{path}/stock_writer"),
             planner=UCPSavePlanner())
    for planner in (DefaultLoadPlanner(), UCPLoadPlanner()):
        target = {"st": make_st(specs["blocks"], None)}
        dcp.load(target, checkpoint_id=f"{path}/stock_writer", planner=planner)
        problems += st_problems(f"UCPSavePlanner+FileSystemWriter -> {type(planner).__name__}", target["st"], full)
    return problems


def case_st_refusals(path: str) -> list[str]:
    """What a ShardedTensor cannot do is refused, naming it: a layout pattern (on save or on a
    load target), a target of another shape. A refused save commits nothing."""
    specs, full, problems = _specs(), reference((10, 20), seed=7), []
    expect = {
        "pattern on save": (
            lambda: dcp.save({"st": make_st(specs["rowwise"], full)}, storage_writer=UCPWriter(f"{path}/p"),
                             planner=UCPSavePlanner(patterns=[PaddedParam("st", size=12)])),
            PatternError, "st: layout patterns do not apply to ShardedTensors"),
        "pattern on load": (
            lambda: load({"st": make_st(specs["colwise"], None)}, f"{path}/ok",
                         UCPLoadPlanner(patterns=[PaddedParam("st", size=12)])),
            LoadPlanError, "st: layout patterns do not apply to ShardedTensor targets"),
        "shape": (lambda: load({"st": make_st(specs["colwise"], None, shape=(10, 21))}, f"{path}/ok"),
                  LoadPlanError, "st: shape mismatch: saved (10, 20), expected (10, 21)"),
    }
    save({"st": make_st(specs["rowwise"], full)}, f"{path}/ok")
    for what, (fn, kind, words) in expect.items():
        error = _error_of(fn)
        if not isinstance(error, kind) or words not in str(error):
            problems.append(f"{what}: {type(error).__name__}: {error}")
    if os.path.exists(f"{path}/p/.metadata"):
        problems.append("the refused save committed")
    return problems


def case_async_process(path: str) -> list[str]:
    """``dcp.async_save`` in process mode with UCPWriter and UCPSavePlanner (no ShardedTensor:
    stock DCP's stager cannot stage one), then ``torch_ucp.async_save`` of ShardedTensors."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    specs, mesh = _specs(), _mesh((2,))
    full, st_full = reference((9, 6), seed=5), reference((10, 20), seed=6)
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None), "step": 7, "blob": bytearray(b"\x00\x01")}
    future = dcp.async_save(sd, storage_writer=UCPWriter(f"{path}/dcp"), planner=UCPSavePlanner(),
                            async_checkpointer_type=AsyncCheckpointerType.PROCESS)
    metadata = future.result()
    problems = []
    if metadata.storage_meta is None or metadata.storage_meta.save_id != load_metadata(open_store(f"{path}/dcp")).save_id:
        problems.append(f"async save's metadata: {metadata.storage_meta}")
    target = {"w": distribute_tensor(torch.zeros(9, 6), mesh, [Shard(1)], src_data_rank=None), "step": 0,
              "blob": bytearray()}
    load(target, f"{path}/dcp")
    problems += dt_problems("w", target["w"], full)
    if target["step"] != 7 or type(target["blob"]) is not bytearray or target["blob"] != b"\x00\x01":
        problems.append(f"values: {target['step']!r} {target['blob']!r}")
    torch_ucp.async_save({"st": make_st(specs["two_per_rank"], st_full)}, f"{path}/ucp").result()
    target = {"st": make_st(specs["colwise"], None)}
    load(target, f"{path}/ucp")
    return problems + st_problems("torch_ucp.async_save st", target["st"], st_full)


# -- cases on 4 ranks: DTensor resharding, state dict shapes, semantics, dtypes ---------------
_1D = {"Shard(0)": [Shard(0)], "Shard(1)": [Shard(1)], "Replicate": [Replicate()]}
_2D = {
    "S0,S1": [Shard(0), Shard(1)],
    "S1,S0": [Shard(1), Shard(0)],
    "R,S0": [Replicate(), Shard(0)],
    "S0,R": [Shard(0), Replicate()],
    "S0,S0": [Shard(0), Shard(0)],
}


def _reshard(path: str, full: torch.Tensor, sources: dict, targets: dict) -> list[str]:
    """Save ``full`` on every ``(mesh, placements)`` source, load into every target."""
    problems = []
    for name, (mesh, placements) in sources.items():
        save({"w": distribute_tensor(full, mesh, placements, src_data_rank=None)}, f"{path}/{name}")
    for src in sources:
        for dst, (mesh, placements) in targets.items():
            zero = torch.zeros_like(full)
            target = {"w": distribute_tensor(zero, mesh, placements, src_data_rank=None) if mesh else zero}
            load(target, f"{path}/{src}")
            problems += dt_problems(f"{src}->{dst}", target["w"], full)
    return problems


def case_dtensor_1d_placement_change(path: str) -> list[str]:
    mesh = _mesh((4,))
    layouts = {k: (mesh, p) for k, p in _1D.items()}
    return _reshard(path, reference((13, 7)), layouts, layouts)


def case_dtensor_2d_placement_change(path: str) -> list[str]:
    mesh = _mesh((2, 2))
    layouts = {k: (mesh, p) for k, p in _2D.items()}
    return _reshard(path, reference((13, 7), seed=1), layouts, layouts)


def case_dtensor_mesh_change(path: str) -> list[str]:
    """1-D <-> 2-D meshes and a plain tensor on every rank."""
    m1, m2 = _mesh((4,)), _mesh((2, 2))
    sources = {"1d-S0": (m1, [Shard(0)]), "2d-S1,S0": (m2, [Shard(1), Shard(0)])}
    targets = {"2d-S0,S1": (m2, [Shard(0), Shard(1)]), "2d-R,S1": (m2, [Replicate(), Shard(1)]),
               "1d-S1": (m1, [Shard(1)]), "plain": (None, None)}
    return _reshard(path, reference((8, 12), seed=2), sources, targets)


def case_dtensor_empty_shards(path: str) -> list[str]:
    """Fewer rows than ranks: ranks 2 and 3 hold nothing of Shard(0)."""
    mesh = _mesh((4,))
    layouts = {k: (mesh, p) for k, p in _1D.items()}
    return _reshard(path, reference((2, 5), seed=3), layouts, {**layouts, "plain": (None, None)})


class Progress(Stateful):
    """A Stateful object (like a data loader's) with a tensor and plain values."""

    def __init__(self, step: int, seen: torch.Tensor) -> None:
        self.step, self.seen, self.loaded = step, seen, False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seen": self.seen, "name": f"progress-{self.step}"}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.seen, self.name, self.loaded = sd["step"], sd["seen"], sd["name"], True


VALUES = {
    "int": 7, "float": -0.0, "str": "é", "none": None, "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"),
    "tuple": (1, (2.5, "x")), "list": [1, [2, {"k": "v"}]], "set": {1, 2}, "dtype": torch.bfloat16,
    "size": torch.Size([3, 4]),
}


# a load target holds the same containers (DCP flattens lists that hold dicts), other leaves
BLANK_VALUES = {
    "int": 0, "float": 1.0, "str": "", "none": 0, "bytes": b"", "bytearray": bytearray(), "tuple": (),
    "list": [0, [0, {"k": ""}]], "set": set(), "dtype": torch.float32, "size": torch.Size([]),
}


def _nested(mesh, fill: bool, placements: list[Any]) -> dict[str, Any]:
    """The nested state: DTensors of ``placements`` on ``mesh`` (plain tensors if ``None``)."""

    def t(shape, seed, p=None):
        full = reference(shape, seed=seed) if fill else torch.zeros(shape)
        return distribute_tensor(full, mesh, p, src_data_rank=None) if mesh is not None and p else full

    return {
        "model": {"layers": [{"w": t((8, 4), 10, placements[0]), "b": t((4,), 11)},
                             {"w": t((8, 4), 12, placements[1])}],
                  "head": {"proj": {"w": t((5, 3), 13, placements[2])}}},
        "values": dict(VALUES if fill else BLANK_VALUES),
        "progress": Progress(3, torch.arange(4)) if fill else Progress(0, torch.zeros(4, dtype=torch.int64)),
    }


def _nested_problems(got: dict[str, Any]) -> list[str]:
    want = _nested(None, True, [None] * 3)
    problems = []
    model, ref = got["model"], want["model"]
    pairs = [("layers.0.w", model["layers"][0]["w"], ref["layers"][0]["w"]),
             ("layers.0.b", model["layers"][0]["b"], ref["layers"][0]["b"]),
             ("layers.1.w", model["layers"][1]["w"], ref["layers"][1]["w"]),
             ("head.proj.w", model["head"]["proj"]["w"], ref["head"]["proj"]["w"])]
    for name, t, full in pairs:
        problems += dt_problems(name, t, full)
    for k, v in VALUES.items():
        g = got["values"][k]
        if type(g) is not type(v) or g != v or (k == "float" and str(g) != "-0.0"):
            problems.append(f"values.{k}: {g!r} ({type(g).__name__}), saved {v!r}")
    p = got["progress"]
    if not (p.loaded and p.step == 3 and torch.equal(p.seen, torch.arange(4)) and p.name == "progress-3"):
        problems.append("progress: not restored")
    return problems


def case_nested_values_stateful(path: str) -> list[str]:
    """Nested dicts and lists of DTensors and tensors, values of every kind, a Stateful."""
    save(_nested(_mesh((4,)), True, [[Shard(0)], [Shard(1)], [Replicate()]]), path)
    target = _nested(_mesh((2, 2)), False, [[Shard(1), Shard(0)], [Replicate(), Shard(0)], [Shard(0), Shard(1)]])
    load(target, path)
    return _nested_problems(target)


def case_overwrite(path: str) -> list[str]:
    problems = []
    a, b = reference((6, 4), seed=20), reference((6, 4), seed=21)
    mesh = _mesh((4,))

    def state(full):
        return {"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)}

    save(state(a), path)
    error = _error_of(lambda: save(state(b), path))
    if not isinstance(error, CheckpointExistsError) or not str(error).startswith("Checkpoint already exists"):
        problems.append(f"second save without overwrite: {type(error).__name__}: {error}")
    target = {"w": torch.zeros(6, 4)}
    load(target, path)
    problems += [] if same_bits(target["w"], a) else ["the refused save changed the checkpoint"]
    save(state(b), path, overwrite=True)
    load(target, path)
    problems += [] if same_bits(target["w"], b) else ["overwrite=True did not replace it"]
    return problems


def case_partial_load(path: str) -> list[str]:
    """A target with fewer keys loads; one with keys the checkpoint lacks is refused unless
    partial loads are allowed (then those keys keep their values)."""
    mesh = _mesh((2, 2))
    full = {k: reference((6, 6), seed=30 + i) for i, k in enumerate("abc")}
    save({k: distribute_tensor(v, mesh, [Shard(0), Shard(1)], src_data_rank=None) for k, v in full.items()}, path)
    problems = []
    for planner in (UCPLoadPlanner(), DefaultLoadPlanner()):
        target = {"b": torch.zeros(6, 6)}
        load(target, path, planner)
        problems += [] if same_bits(target["b"], full["b"]) else [f"{type(planner).__name__}: subset differs"]
    for planner, allowed in ((UCPLoadPlanner(), False), (DefaultLoadPlanner(), False),
                             (UCPLoadPlanner(allow_partial_load=True), True),
                             (DefaultLoadPlanner(allow_partial_load=True), True)):
        target = {"a": torch.zeros(6, 6), "extra": torch.full((2,), 5.0)}
        error = _error_of(lambda planner=planner, target=target: load(target, path, planner))
        name = f"{type(planner).__name__}(allow_partial_load={allowed})"
        if allowed:
            if error is not None or not same_bits(target["a"], full["a"]) or not torch.equal(target["extra"], torch.full((2,), 5.0)):
                problems.append(f"{name}: {error!r}")
        elif error is None or "extra" not in str(error):
            problems.append(f"{name} accepted a missing key: {error!r}")
    return problems


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(torch.empty(shape, dtype=dtype).nbytes, dtype=torch.uint8).view(dtype).reshape(shape)


def _local_dtensor(full: torch.Tensor, mesh, placements) -> DTensor:
    """``full`` as a DTensor, sliced here by torch's own local shape and offset (torch cannot
    fill the empty shards ``distribute_tensor`` makes for packed dtypes)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = _box(full, offset, shape).contiguous()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def _exotic(mesh, names: list[str], fill: bool) -> dict[str, Any]:
    out = {}
    for i, n in enumerate(names):
        dtype = name_to_dtype(n)
        full = reference((8, 6), dtype, seed=i) if fill else _zeros((8, 6), dtype)
        out[n] = _local_dtensor(full, mesh, [Shard(0)] if fill else [Shard(1)])
        out[f"{n}.plain"] = reference((3, 5), dtype, seed=100 + i) if fill else _zeros((3, 5), dtype)
    return out


def case_every_dtype(path: str) -> list[str]:
    """Every format dtype as Shard(0) DTensors and plain tensors, loaded into Shard(1)."""
    names = dtype_names()
    mesh = _mesh((4,))
    save(_exotic(mesh, names, True), path)
    target = _exotic(mesh, names, False)
    load(target, path)
    problems = []
    for i, n in enumerate(names):
        dtype = name_to_dtype(n)
        want = _local_dtensor(reference((8, 6), dtype, seed=i), mesh, [Shard(1)]).to_local()
        if not same_bits(target[n].to_local(), want):
            problems.append(f"{n}: local shard differs")
        if not same_bits(target[f"{n}.plain"], reference((3, 5), dtype, seed=100 + i)):
            problems.append(f"{n}.plain: differs")
    return problems


def case_storage_meta(path: str) -> list[str]:
    """``dcp.save`` returns ``storage_meta`` (checkpoint id, save id) on every rank; readers
    have a ``load_id``, new on every reset, set in the metadata they return."""
    problems = []
    metadata = save({"w": reference((4, 4))}, path)
    header = load_metadata(open_store(path))
    meta = metadata.storage_meta
    if meta is None or meta.save_id != header.save_id or meta.checkpoint_id != open_store(path).url:
        problems.append(f"dcp.save returned storage_meta {meta}, header save id {header.save_id}")
    reader = UCPReader(path)
    first = reader.load_id
    md = reader.read_metadata()
    if not first or md.storage_meta.load_id != first or md.storage_meta.save_id != header.save_id:
        problems.append(f"read_metadata: {md.storage_meta}, reader load_id {first}")
    planner = UCPLoadPlanner()
    dcp.load({"w": torch.zeros(4, 4)}, storage_reader=reader, planner=planner)
    if planner.metadata.storage_meta.load_id != first:
        problems.append(f"dcp.load: planner saw {planner.metadata.storage_meta}, reader load_id {first}")
    dcp.load({"w": torch.zeros(4, 4)}, checkpoint_id=path, storage_reader=reader, planner=planner)  # resets it
    if reader.load_id == first or planner.metadata.storage_meta.load_id != reader.load_id:
        problems.append(f"after reset: load_id {reader.load_id} (was {first}), planner saw {planner.metadata.storage_meta}")
    return problems


CASES_WS2 = [case_st_rowwise_to_colwise, case_st_shard_plans, case_st_tensor_switch, case_st_dtensor_switch,
             case_st_dtypes_and_nesting, case_st_stock_planners, case_st_refusals, case_async_process]
CASES_WS4 = [case_dtensor_1d_placement_change, case_dtensor_2d_placement_change, case_dtensor_mesh_change,
             case_dtensor_empty_shards, case_nested_values_stateful, case_overwrite, case_partial_load,
             case_every_dtype, case_storage_meta]


def run_cases(base: str, names: list[str]) -> dict[str, list[str]]:
    """Rank function: every case in turn (each in its own folder); a case's exception becomes
    its one problem. DCP raises a rank's failure on every rank, so ranks stay in step."""
    cases = {c.__name__: c for c in CASES_WS2 + CASES_WS4}
    out = {}
    for name in names:
        dist.barrier()
        try:
            out[name] = cases[name](os.path.join(base, name))
        except BaseException as e:  # noqa: BLE001 - reported as the case's result
            out[name] = [f"{type(e).__name__}: {e}", traceback.format_exc(limit=-3)]
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def ws2(base) -> list[dict[str, list[str]]]:
    return run_distributed(run_cases, 2, f"{base}/ws2", [c.__name__ for c in CASES_WS2])


@pytest.fixture(scope="module")
def ws4(base) -> list[dict[str, list[str]]]:
    return run_distributed(run_cases, 4, f"{base}/ws4", [c.__name__ for c in CASES_WS4])


@pytest.mark.parametrize("case", [c.__name__ for c in CASES_WS2])
def test_two_ranks(ws2, case):
    for rank, results in enumerate(ws2):
        assert results[case] == [], f"rank {rank}: {results[case]}"


@pytest.mark.parametrize("case", [c.__name__ for c in CASES_WS4])
def test_four_ranks(ws4, case):
    for rank, results in enumerate(ws4):
        assert results[case] == [], f"rank {rank}: {results[case]}"


# -- in this process: what the saves recorded, stock entry points, options, dtype edges -------
def test_sharded_tensor_layouts_recorded(ws2, base, capsys):
    """A chunk-sharded ShardedTensor is recorded as a 1-D mesh of its placement ranks with
    Shard(d) (writers derived); other plans list their writers; inspect names ShardedTensor."""
    from torch_ucp.cli.main import main

    root = f"{base}/ws2/case_st_shard_plans"
    expected = {  # plan -> (fragments, placements or None, writers or None)
        "rowwise": (2, [("shard", 0)], None),
        "colwise": (2, [("shard", 1)], None),
        "two_per_rank": (4, None, (0, 1)),
        "enumerable": (5, None, (0, 1)),
        "enumerable_uneven": (2, None, (0, 1)),  # 8 + 2 rows: not torch.chunk's 5 + 5
        "blocks": (4, None, (0, 1)),
    }
    for plan, (fragments, placements, writers) in expected.items():
        entry = load_metadata(open_store(f"{root}/{plan}")).tensors["st"]
        got = [(p.kind, p.dim) for p in entry.placements] if entry.placements else None
        assert (entry.fragments, got, entry.writers, entry.saved_as) == (
            fragments, placements, writers, "sharded_tensor"), plan
    assert main(["inspect", f"{root}/rowwise"]) == 0
    assert "ShardedTensor mesh(2) [Shard(0)]" in capsys.readouterr().out
    assert main(["inspect", f"{root}/enumerable", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["tensors"]["st"]
    assert info["saved_as"] == "sharded_tensor" and info["fragments"] == 5 and info["placements"] is None


def _assert_names_torch_ucp(error: BaseException, path: str) -> None:
    text = str(error)
    assert f"{path} is a torch_ucp checkpoint" in text, text
    for call in ("torch_ucp.UCPReader(", "torch_ucp.open_checkpoint(", "torch-ucp export"):
        assert call in text, call


def test_stock_entry_points_name_torch_ucp(tmp_path):
    """Stock readers built from a path fail at once, naming torch_ucp and what to call."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path / "ucp")
    torch_ucp.save({"w": torch.ones(3)}, path)
    for reader in (FileSystemReader(path), _compat.fsspec_dcp_reader(path, {})):
        with pytest.raises(UnsupportedFormatError) as info:
            reader.read_metadata()
        assert isinstance(info.value, pickle.UnpicklingError)  # what stock raised: handlers still match
        assert "invalid load key" in str(info.value.__cause__)
        _assert_names_torch_ucp(info.value, path)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(3)}, checkpoint_id=path, no_dist=True)
    _assert_names_torch_ucp(info.value, path)
    with pytest.raises(CheckpointException) as info:
        dcp_to_torch_save(path, str(tmp_path / "out.pt"))
    _assert_names_torch_ucp(info.value, path)
    assert not (tmp_path / "out.pt").exists()
    # version-1 checkpoints too
    v1 = os.path.join(FIXTURES, "ws1-plain")
    with pytest.raises(UnsupportedFormatError):
        FileSystemReader(v1).read_metadata()


def test_stock_readers_otherwise_unchanged(tmp_path):
    """Stock checkpoints read as before; a pickle error of anything else stays one."""
    stock = str(tmp_path / "stock")
    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=stock, no_dist=True)
    assert list(FileSystemReader(stock).read_metadata().state_dict_metadata) == ["w"]
    target = {"w": torch.zeros(4)}
    dcp.load(target, checkpoint_id=stock, no_dist=True)
    assert torch.equal(target["w"], torch.arange(4.0))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(b"{not a torch_ucp header")
    with pytest.raises(pickle.UnpicklingError) as info:
        FileSystemReader(str(bad)).read_metadata()
    assert not isinstance(info.value, UnsupportedFormatError)


def test_load_state_dict_from_keys(ws4, base):
    """``_load_state_dict_from_keys`` through UCPReader: the chosen keys, as full tensors."""
    path = f"{base}/ws4/case_nested_values_stateful"
    got = _load_state_dict_from_keys({"model", "values.bytearray"}, storage_reader=UCPReader(path))
    want = _nested(None, True, [None] * 3)["model"]
    assert sorted(got) == ["model", "values"] and list(got["values"]) == ["bytearray"]
    assert type(got["values"]["bytearray"]) is bytearray and got["values"]["bytearray"] == b"ab"
    assert same_bits(got["model"]["layers"][0]["w"], want["layers"][0]["w"])
    assert same_bits(got["model"]["layers"][1]["w"], want["layers"][1]["w"])
    assert same_bits(got["model"]["head"]["proj"]["w"], want["head"]["proj"]["w"])


def test_values_keep_their_type_with_stock_planners(tmp_path):
    path = str(tmp_path / "c")
    sd = {"w": torch.ones(2), "v": dict(VALUES)}
    save_plain(path, sd, planner=DefaultSavePlanner())
    target = load_plain(path, {"w": torch.zeros(2), "v": dict(BLANK_VALUES)}, planner=DefaultLoadPlanner())
    for k, v in VALUES.items():
        assert type(target["v"][k]) is type(v) and target["v"][k] == v, k


def test_filesystem_writer_options(tmp_path):
    """Each stock FileSystemWriter option is honoured or refused with what to use instead."""
    from torch.testing._internal.distributed.checkpoint_utils import Rot13Example

    url = str(tmp_path / "c")
    assert UCPWriter(url, thread_count=3).threads == 3
    assert UCPWriter(url, thread_count=3, threads=3).threads == 3
    writer = UCPWriter(url, single_file_per_rank=True, sync_files=True, cache_staged_state_dict=False, _extensions=[])
    assert writer.storage_options == {}  # none of them reaches fsspec
    refused = {
        "single_file_per_rank": (False, "one data object per writer thread"),
        "sync_files": (False, "durable before the header commits"),
        "per_thread_copy_ahead": (10_000_000, "torch_ucp.async_save"),
        "cache_staged_state_dict": (True, "staging pool"),
        "serialization_format": (None, "torch-ucp export"),
        "_extensions": ([Rot13Example()], "raw bytes"),
    }
    for name, (value, hint) in refused.items():
        with pytest.raises(ValueError, match=f"UCPWriter: {name}") as info:
            UCPWriter(url, **{name: value})
        assert hint in str(info.value), name
    with pytest.raises(ValueError, match="disagree"):
        UCPWriter(url, threads=2, thread_count=4)
    from torch.distributed.checkpoint._extension import ExtensionRegistry

    with pytest.raises(ValueError, match="UCPReader: _extension_registry"):
        UCPReader(url, _extension_registry=ExtensionRegistry())
    assert UCPReader(url, _extension_registry=None).storage_options == {}


@pytest.mark.parametrize("make, words", [
    (lambda: torch.empty(4, dtype=torch.int4), "sub-byte placeholder"),
    (lambda: torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.qint8), "scale and zero point"),
])
def test_unstorable_dtypes_refused(tmp_path, make, words):
    with pytest.raises(ValueError) as info:
        torch_ucp.save({"q": make()}, str(tmp_path / "c"))
    assert str(info.value).startswith("q: cannot save:") and words in str(info.value)
    assert not (tmp_path / "c" / ".metadata").exists()


def test_packed_dtypes_load_only_as_themselves(tmp_path):
    path = str(tmp_path / "c")
    torch_ucp.save({"fp4": reference((4, 2), torch.float4_e2m1fn_x2), "f8": reference((4,), torch.float8_e8m0fnu)}, path)
    with pytest.raises(LoadPlanError, match="fp4: saved as torch.float4_e2m1fn_x2, target is torch.float32"):
        torch_ucp.load({"fp4": torch.zeros(4, 2)}, path)
    target = {"f8": torch.zeros(4)}  # a float8 casts like any float
    torch_ucp.load(target, path)
    assert torch.equal(target["f8"], reference((4,), torch.float8_e8m0fnu).float())


def test_export_every_dtype(tmp_path, capsys):
    """``torch-ucp export --format torch`` keeps every dtype bit-exact; safetensors takes the
    dtypes the safetensors library maps to torch and refuses the others by name."""
    from safetensors.torch import load_file

    from torch_ucp.cli.main import main
    from torch_ucp.interop.safetensors import SAFETENSORS_DTYPES

    src = str(tmp_path / "c")
    sd = {n: reference((4, 6), name_to_dtype(n), seed=i) for i, n in enumerate(dtype_names())}
    torch_ucp.save(sd, src)
    assert main(["export", src, str(tmp_path / "all.pt"), "--format", "torch", "--quiet"]) == 0
    out = torch.load(tmp_path / "all.pt", weights_only=True)
    assert sorted(out) == sorted(sd) and all(same_bits(out[k], sd[k]) for k in sd)
    kept = [n for n in sd if sd[n].dtype in SAFETENSORS_DTYPES.values()]
    assert {"float8_e4m3fnuz", "float8_e5m2fnuz"} <= set(kept)
    assert main(["export", src, str(tmp_path / "st"), "--keys", *kept, "--quiet"]) == 0
    got = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert sorted(got) == sorted(kept) and all(same_bits(got[k], sd[k]) for k in kept)
    capsys.readouterr()
    assert main(["export", src, str(tmp_path / "st2"), "--keys", "float4_e2m1fn_x2", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "float4_e2m1fn_x2: dtype torch.float4_e2m1fn_x2 cannot be stored in safetensors; use the torch format" in err
