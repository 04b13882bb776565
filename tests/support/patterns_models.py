"""Models, layouts and exact references for the pattern tests (tests/test_patterns.py).

The *logical* model is what one process without any parallelism holds: a fused QKV weight is
the plain concatenation ``[q; k; v]``, a fused gate/up weight ``[gate; up]``, the vocabulary
has its real size, experts are either one stacked ``[E, ...]`` tensor or ``E`` per-item tensors.
Every logical value is generated from its name (any process can rebuild it), trained for two
steps with real optimizers on every layout:

- AdamW (``exp_avg``, ``exp_avg_sq``, ``step``) for layer 0 and the embedding, norm and head,
- SGD with momentum (``momentum_buffer``) for layer 1's attention,
- :class:`SignEMA`, a custom optimizer whose state is called ``sign_ema``, for layer 1's MLP.

A *layout* builds the same model the way a trainer does (``ColwiseParallel`` on the fused
``Linear``s, ``fully_shard`` on top, vocabularies padded to a multiple of the TP degree, experts
sharded over an ``"ep"`` mesh dim): its parameters hold the logical values interleaved per TP
rank (``rank t: [q_t; k_t; v_t]``), padded with zeros, or stacked. Gradients are built the same
way, and every optimizer update is elementwise, so after training each layout holds exactly the
reference state transformed into its own layout: bit-exact expectations for every target.

Rank functions run under :func:`torch_ucp.demo.launch.run_distributed` or in one process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter
from torch_ucp.patterns import FusedParam, PaddedParam, Rename, StackedParam

# -- shapes ------------------------------------------------------------------------------------
DIM = 32
N_HEADS, N_KV_HEADS, HEAD_DIM = 8, 4, 4  # GQA: two query heads per kv head
QKV_PARTS = (N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM)  # q, k, v rows
FFN = 24
GATE_UP_PARTS = (FFN, FFN)
VOCAB = 61  # real vocabulary: padded to 62 at TP=2, 64 at TP=4
N_LAYERS = 2
N_EXPERTS, EXPERT_HIDDEN = 4, 8

QKV = "layers.*.attention.wqkv.weight"
GATE_UP = "layers.*.feed_forward.w13.weight"


def dense_patterns(*, embeddings: bool = True, head: bool = True, degree: int | None = None) -> list[Any]:
    out: list[Any] = [
        FusedParam(QKV, QKV_PARTS, degree=degree),
        FusedParam(GATE_UP, GATE_UP_PARTS, degree=degree),
    ]
    if embeddings:
        out.append(PaddedParam("tok_embeddings.weight", VOCAB))
    if head:
        out.append(PaddedParam("output.weight", VOCAB))
    return out


def moe_patterns() -> list[Any]:
    return [
        StackedParam("layers.*.moe.experts.w1", "layers.*.moe.experts.{i}.w1"),
        StackedParam("layers.*.moe.experts.w2", "layers.*.moe.experts.{i}.w2"),
    ]


def padded_vocab(tp: int) -> int:
    return -(-VOCAB // tp) * tp


# -- modules -----------------------------------------------------------------------------------
class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(DIM))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wqkv = nn.Linear(DIM, sum(QKV_PARTS), bias=False)
        self.wo = nn.Linear(QKV_PARTS[0], DIM, bias=False)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w13 = nn.Linear(DIM, sum(GATE_UP_PARTS), bias=False)
        self.w2 = nn.Linear(FFN, DIM, bias=False)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = Norm()
        self.attention = Attention()
        self.feed_forward = FeedForward()


class Dense(nn.Module):
    """A transformer's parameters (no forward is needed to checkpoint them); a pipeline stage
    holds ``n_layers`` blocks numbered locally from 0, with or without embeddings and head."""

    def __init__(self, vocab: int, n_layers: int = N_LAYERS, embeddings: bool = True, head: bool = True):
        super().__init__()
        if embeddings:
            self.tok_embeddings = nn.Embedding(vocab, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        if head:
            self.norm = Norm()
            self.output = nn.Linear(DIM, vocab, bias=False)


class StackedExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(N_EXPERTS, EXPERT_HIDDEN, DIM))
        self.w2 = nn.Parameter(torch.zeros(N_EXPERTS, DIM, EXPERT_HIDDEN))


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(EXPERT_HIDDEN, DIM))
        self.w2 = nn.Parameter(torch.zeros(DIM, EXPERT_HIDDEN))


class MoELayer(nn.Module):
    def __init__(self, stacked: bool) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, N_EXPERTS, bias=False)
        self.experts = StackedExperts() if stacked else nn.ModuleList(Expert() for _ in range(N_EXPERTS))


class MoEBlock(nn.Module):
    def __init__(self, stacked: bool) -> None:
        super().__init__()
        self.moe = MoELayer(stacked)


class MoE(nn.Module):
    def __init__(self, stacked: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MoEBlock(stacked) for _ in range(N_LAYERS))


class Wrapped(nn.Module):
    """A model held under another attribute (``module``, ``_orig_mod``): every FQN gets a prefix
    that DCP's ``get_state_dict`` does not strip (it only strips real DDP / compiled wrappers)."""

    def __init__(self, attr: str, inner: nn.Module) -> None:
        super().__init__()
        setattr(self, attr, inner)


class SignEMA(torch.optim.Optimizer):
    """A Lion-like optimizer whose per-parameter state has its own name, ``sign_ema``."""

    def __init__(self, params, lr: float = 1e-2, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sign_ema" not in state:
                    state["sign_ema"] = torch.zeros_like(p)
                ema = state["sign_ema"]
                ema.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(ema.sign(), alpha=-group["lr"])


def make_optimizers(model: nn.Module, layer_offset: int = 0) -> list[torch.optim.Optimizer]:
    """AdamW / SGD-momentum / SignEMA by the parameter's global name (see module docstring)."""
    groups: dict[str, list[nn.Parameter]] = {"adamw": [], "sgd": [], "sign": []}
    for name, p in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.(attention|feed_forward|moe)", name)
        if m is None or int(m[1]) + layer_offset == 0:
            groups["adamw"].append(p)
        elif m[2] == "attention":
            groups["sgd"].append(p)
        else:
            groups["sign"].append(p)
    out: list[torch.optim.Optimizer] = []
    if groups["adamw"]:
        out.append(torch.optim.AdamW(groups["adamw"], lr=1e-2, weight_decay=0.1, foreach=False))
    if groups["sgd"]:
        out.append(torch.optim.SGD(groups["sgd"], lr=0.1, momentum=0.9, foreach=False))
    if groups["sign"]:
        out.append(SignEMA(groups["sign"]))
    return out


# -- logical values and their layouts ----------------------------------------------------------
def seeded(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
    return torch.randn(shape, generator=g)


def interleave(t: torch.Tensor, parts: tuple[int, ...], tp: int) -> torch.Tensor:
    """The fused tensor a TP=``tp`` layout holds: rank r's rows are ``[part_0 chunk r; ...]``."""
    chunks = [p.split(p.shape[0] // tp) for p in t.split(parts)]
    return torch.cat([chunks[j][r] for r in range(tp) for j in range(len(parts))])


def pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def dense_physical(name: str, t: torch.Tensor, tp: int) -> torch.Tensor:
    """Logical tensor (a parameter or one of its states) -> what layout TP=``tp`` holds."""
    if t.ndim == 0:
        return t
    if name.endswith("attention.wqkv.weight"):
        return interleave(t, QKV_PARTS, tp)
    if name.endswith("feed_forward.w13.weight"):
        return interleave(t, GATE_UP_PARTS, tp)
    if name.endswith(("tok_embeddings.weight", "output.weight")):
        return pad(t, padded_vocab(tp))
    return t


def set_logical(model: nn.Module, prefix: str, physical: Callable[[str, torch.Tensor], torch.Tensor],
                items: bool = False, layer_offset: int = 0) -> None:
    """Fill a plain (not yet parallelized) model with the named logical values in its layout."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(physical(name, logical_value(prefix, global_name(name, layer_offset), items)))


def global_name(name: str, layer_offset: int) -> str:
    if not layer_offset:
        return name
    return re.sub(r"layers\.(\d+)", lambda m: f"layers.{int(m[1]) + layer_offset}", name)


def item_of(name: str) -> tuple[str, int | None]:
    """``layers.0.moe.experts.3.w1`` -> (``layers.0.moe.experts.w1``, 3); others -> (name, None)."""
    m = re.search(r"moe\.experts\.(\d+)\.", name)
    if m is None:
        return name, None
    return name[: m.start(1)] + name[m.end(1) + 1 :], int(m[1])


def logical_shape_of(name: str) -> tuple[int, ...]:
    if name.endswith(("tok_embeddings.weight", "output.weight")):
        return (VOCAB, DIM)
    shapes = {
        "attention.wqkv.weight": (sum(QKV_PARTS), DIM),
        "attention.wo.weight": (DIM, QKV_PARTS[0]),
        "feed_forward.w13.weight": (sum(GATE_UP_PARTS), DIM),
        "feed_forward.w2.weight": (DIM, FFN),
        "norm.weight": (DIM,),
        "moe.router.weight": (N_EXPERTS, DIM),
        "moe.experts.w1": (N_EXPERTS, EXPERT_HIDDEN, DIM),
        "moe.experts.w2": (N_EXPERTS, DIM, EXPERT_HIDDEN),
    }
    for suffix, shape in shapes.items():
        if name.endswith(suffix):
            return shape
    raise KeyError(name)


def logical_value(prefix: str, name: str, items: bool = False) -> torch.Tensor:
    """Named logical value (``prefix`` selects initial weights or a step's gradient); for a
    per-item expert name, its item of the stacked value."""
    stacked, i = item_of(name) if items else (name, None)
    t = seeded(f"{prefix}:{stacked}", logical_shape_of(stacked))
    return t if i is None else t[i].clone()


def place(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like`` (a DTensor's placements, or a plain tensor)."""
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full.clone()


def train(model: nn.Module, optims: list[torch.optim.Optimizer],
          physical: Callable[[str, torch.Tensor], torch.Tensor], items: bool = False) -> None:
    """Two optimizer steps with named logical gradients in the model's layout."""
    for step in (1, 2):
        for name, p in model.named_parameters():
            p.grad = place(physical(name, logical_value(f"grad{step}", name, items)), p)
        for o in optims:
            o.step()
            o.zero_grad()


# -- layouts -----------------------------------------------------------------------------------
# name -> (mesh shape, mesh dim names, tp degree, fsdp); None: one process, no mesh
DENSE_LAYOUTS: dict[str, tuple[tuple[int, ...] | None, tuple[str, ...] | None, int, bool]] = {
    "tp2_fsdp": ((2, 2), ("dp", "tp"), 2, True),  # FSDP2 x TP: _StridedShard on the fused dim
    "tp2": ((2, 2), ("dp", "tp"), 2, False),  # TP=2, replicated over dp
    "tp4": ((4,), ("tp",), 4, False),
    "dp4": ((4,), ("dp",), 1, True),  # TP=1, FSDP
    "plain": (None, None, 1, False),
}

TP_PLAN = {
    "attention.wqkv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),
    "feed_forward.w13": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}


def build_dense(layout: str, *, trained: bool, embeddings: bool = True, head: bool = True,
                n_layers: int = N_LAYERS, layer_offset: int = 0):
    """``(model, optimizers, tp)`` on ``layout``: trained from the logical values, or holding
    unrelated values (a load target)."""
    mesh_shape, names, tp, fsdp = DENSE_LAYOUTS[layout]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names) if mesh_shape else None
    model = Dense(padded_vocab(tp), n_layers, embeddings, head)

    def physical(name: str, t: torch.Tensor) -> torch.Tensor:
        return dense_physical(name, t, tp)

    set_logical(model, "init" if trained else "junk", physical, layer_offset=layer_offset)
    if tp > 1:
        tp_mesh = mesh["tp"]
        plan = {}
        if embeddings:
            plan["tok_embeddings"] = RowwiseParallel()
        if head:
            plan["output"] = ColwiseParallel()
        parallelize_module(model, tp_mesh, plan)
        for block in model.layers:
            parallelize_module(block, tp_mesh, dict(TP_PLAN))
    if fsdp:
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    optims = make_optimizers(model, layer_offset)
    if trained:
        train(model, optims, physical)
    return model, optims, tp


# name -> (mesh shape, mesh dim names, stacked, ep degree, fsdp)
MOE_LAYOUTS: dict[str, tuple[tuple[int, ...] | None, tuple[str, ...] | None, bool, int, bool]] = {
    "ep2": ((2, 2), ("dp", "ep"), True, 2, True),  # experts (Shard(1) over dp, Shard(0) over ep)
    "ep4": ((4,), ("ep",), True, 4, False),
    "items_dp4": ((4,), ("dp",), False, 1, True),  # per-item experts, FSDP
    "plain_stacked": (None, None, True, 1, False),
    "plain_items": (None, None, False, 1, False),
}


def build_moe(layout: str, *, trained: bool):
    mesh_shape, names, stacked, ep, fsdp = MOE_LAYOUTS[layout]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names) if mesh_shape else None
    model = MoE(stacked)

    def physical(name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    set_logical(model, "init" if trained else "junk", physical, items=not stacked)
    if ep > 1:
        for block in model.layers:
            experts = block.moe.experts
            for attr in ("w1", "w2"):
                full = getattr(experts, attr).data
                setattr(experts, attr, nn.Parameter(distribute_tensor(full, mesh["ep"], [Shard(0)])))
    if fsdp:
        for block in model.layers:
            if stacked:  # torchtitan-style: experts sharded on dim 1 over dp, dim 0 over ep
                fully_shard(block.moe.experts, mesh=mesh["dp"], shard_placement_fn=lambda p: Shard(1))
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    optims = make_optimizers(model)
    if trained:
        train(model, optims, physical, items=not stacked)
    return model, optims, ep


# -- references and checks -----------------------------------------------------------------------
@functools.cache
def reference(kind: str) -> dict[str, Any]:
    """The trained logical state, flattened like DCP: ``model.<fqn>``, ``optim.state.<fqn>.<k>``."""
    if kind == "dense":
        model, optims, _ = build_dense("plain", trained=True)
    else:
        model, optims, _ = build_moe("plain_stacked", trained=True)
    msd, osd = get_state_dict(model, optims)
    flat, _ = flatten_state_dict({"model": msd, "optim": osd})
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in flat.items()}


def split_key(key: str) -> tuple[str, str | None] | None:
    """``model.<fqn>`` -> (fqn, None); ``optim.state.<fqn>.<state>`` -> (fqn, state)."""
    if key.startswith("model."):
        return key[len("model."):], None
    if key.startswith("optim.state."):
        fqn, _, state = key[len("optim.state."):].rpartition(".")
        return fqn, state
    return None


def observed_state(model: nn.Module, optims: list[torch.optim.Optimizer]) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optims)
    return flatten_state_dict({"model": msd, "optim": osd})[0]


def check(kind: str, state: dict[str, Any], degree: int, rename: Callable[[str], str] = lambda k: k,
          keys: Callable[[str], bool] = lambda k: True) -> dict[str, Any]:
    """Compare every tensor of a flattened target ``state`` (a parameter or any optimizer state)
    with the reference transformed into the target's layout; local shards bit-exact.

    Returns ``{"checked": ["<fqn>:<param|state name>", ...], "problems": [...]}``; ``rename``
    maps a target FQN to its logical (reference) FQN.
    """
    ref = reference(kind)
    checked, problems = [], []
    for key, got in state.items():
        parsed = split_key(key)
        if parsed is None or not keys(key) or not isinstance(got, torch.Tensor):
            continue
        fqn, state_name = parsed
        logical_fqn, item = item_of(rename(fqn))
        ref_key = f"model.{logical_fqn}" if state_name is None else f"optim.state.{logical_fqn}.{state_name}"
        label = f"{rename(fqn)}:{state_name or 'param'}"
        if ref_key not in ref:
            problems.append(f"{label}: no reference {ref_key}")
            continue
        expected = ref[ref_key]
        if item is not None and expected.ndim > 0:
            expected = expected[item]
        if kind == "dense":
            expected = dense_physical(logical_fqn, expected, degree)
        checked.append(label)
        if isinstance(got, DTensor) and expected.ndim == 0:
            problems.append(f"{label}: a DTensor where the reference is a scalar")
            continue
        if tuple(got.shape) != tuple(expected.shape):
            problems.append(f"{label}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
            continue
        want = place(expected, got)
        local_got = got.to_local() if isinstance(got, DTensor) else got
        local_want = want.to_local() if isinstance(want, DTensor) else want
        if local_got.dtype != local_want.dtype or not torch.equal(local_got, local_want):
            problems.append(f"{label}: values differ")
    return {"checked": checked, "problems": problems}


def load_and_check(kind: str, model: nn.Module, optims: list[torch.optim.Optimizer], degree: int,
                   path: str, planner: Any, *, stock: bool = False, no_dist: bool = False,
                   rename: Callable[[str], str] = lambda k: k) -> dict[str, Any]:
    """Load ``path`` into the model and optimizers through DCP's state-dict API, then check the
    live parameters and optimizer states (read back with ``get_state_dict``)."""
    msd, osd = get_state_dict(model, optims)
    own_params = [g["params"] for g in osd["param_groups"]]
    state = {"model": msd, "optim": osd}
    reader = FileSystemReader(path) if stock else UCPReader(path)
    dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    # param_groups list their parameters by FQN as values: keep the target's own names
    for group, params in zip(state["optim"]["param_groups"], own_params):
        group["params"] = params
    set_state_dict(model, optims, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return check(kind, observed_state(model, optims), degree, rename)


def save(model: nn.Module, optims: list[torch.optim.Optimizer], path: str, planner: Any, *,
         stock: bool = False, no_dist: bool = False) -> None:
    msd, osd = get_state_dict(model, optims)
    writer = FileSystemWriter(path) if stock else UCPWriter(path)
    dcp.save({"model": msd, "optim": osd}, storage_writer=writer, planner=planner, no_dist=no_dist)


def guarded(results: dict[str, Any], case: str, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        results[case] = fn()
    except (Exception, CheckpointException) as e:  # reported per case by the test
        results[case] = {"checked": [], "problems": [error_message(e)]}


def unwrap(e: BaseException) -> BaseException:
    """The error itself, not DCP's wrapper with every rank's traceback."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    return e


def error_message(e: BaseException) -> str:
    e = unwrap(e)
    return f"{type(e).__name__}: {e}"


# -- the distributed run -------------------------------------------------------------------------
def strip_prefix(attr: str) -> Callable[[str], str]:
    return lambda fqn: fqn[len(attr) + 1:] if fqn.startswith(attr + ".") else fqn


def run_saves(base: str) -> None:
    """Rank function (4 ranks): every source checkpoint."""
    model, optims, _ = build_dense("tp2_fsdp", trained=True)
    save(model, optims, os.path.join(base, "dense_tp2_fsdp"), UCPSavePlanner(patterns=dense_patterns()))
    model, optims, _ = build_dense("tp4", trained=True)
    save(model, optims, os.path.join(base, "dense_tp4"), UCPSavePlanner(patterns=dense_patterns()))
    # a compiled-looking model: every FQN has an "_orig_mod." prefix
    model, optims, _ = build_dense("tp2_fsdp", trained=True)
    save(Wrapped("_orig_mod", model), optims, os.path.join(base, "dense_orig_mod"),
         UCPSavePlanner(patterns=[Rename(r"_orig_mod\.", ""), *dense_patterns()]))
    # stock DCP, TP=2: stores the interleaved (physical) tensors and the padded vocabulary
    model, optims, _ = build_dense("tp2", trained=True)
    save(model, optims, os.path.join(base, "stock_tp2"), DefaultSavePlanner(), stock=True)
    model, optims, _ = build_moe("ep2", trained=True)
    save(model, optims, os.path.join(base, "moe_ep2"), UCPSavePlanner(patterns=moe_patterns()))
    model, optims, _ = build_moe("items_dp4", trained=True)
    save(model, optims, os.path.join(base, "moe_items_dp4"), UCPSavePlanner(patterns=moe_patterns()))


def is_fused(key: str) -> bool:
    return "wqkv" in key or "w13" in key


def stock_load_fused(base: str, target: str) -> dict[str, Any]:
    """Stock DCP loads the stock TP=2 checkpoint's fused tensors into ``target`` (the padded
    vocabulary is left out: stock DCP refuses its size change outright)."""
    model, optims, tp = build_dense(target, trained=False)
    msd, osd = get_state_dict(model, optims)
    flat = flatten_state_dict({"model": msd, "optim": osd})[0]
    sub = {k: v for k, v in flat.items() if is_fused(k) and isinstance(v, DTensor)}
    dcp.load(sub, storage_reader=FileSystemReader(os.path.join(base, "stock_tp2")),
             planner=DefaultLoadPlanner())
    return check("dense", sub, tp)


def run_loads(base: str) -> dict[str, Any]:
    """Rank function (4 ranks): load the sources into every distributed target layout."""
    results: dict[str, Any] = {}

    def dense(source: str, target: str, planner: Any, **kw: Any) -> Callable[[], dict[str, Any]]:
        def case() -> dict[str, Any]:
            model, optims, tp = build_dense(target, trained=False)
            return load_and_check("dense", model, optims, tp, os.path.join(base, source), planner, **kw)
        return case

    def moe(source: str, target: str) -> Callable[[], dict[str, Any]]:
        def case() -> dict[str, Any]:
            model, optims, ep = build_moe(target, trained=False)
            return load_and_check("moe", model, optims, ep, os.path.join(base, source), UCPLoadPlanner())
        return case

    for target in ("tp4", "dp4", "tp2"):
        guarded(results, f"dense_tp2_fsdp->{target}", dense("dense_tp2_fsdp", target, UCPLoadPlanner()))
    guarded(results, "dense_tp2_fsdp->tp2_fsdp", dense(
        "dense_tp2_fsdp", "tp2_fsdp", UCPLoadPlanner(patterns=dense_patterns())))
    guarded(results, "dense_tp4->tp2_fsdp", dense("dense_tp4", "tp2_fsdp", UCPLoadPlanner()))
    guarded(results, "dense_orig_mod->tp4", dense("dense_orig_mod", "tp4", UCPLoadPlanner()))

    def wrapped_target() -> dict[str, Any]:  # "module." prefix on the target side
        model, optims, tp = build_dense("tp4", trained=False)
        planner = UCPLoadPlanner(patterns=[Rename(r"(^|\.)module\.", r"\1"), *dense_patterns()])
        return load_and_check("dense", Wrapped("module", model), optims, tp,
                              os.path.join(base, "dense_tp2_fsdp"), planner, rename=strip_prefix("module"))

    guarded(results, "dense_tp2_fsdp->module.tp4", wrapped_target)
    guarded(results, "stock_tp2->tp2 (stock dcp)", lambda: stock_load_fused(base, "tp2"))
    guarded(results, "stock_tp2->tp4 (stock dcp)", lambda: stock_load_fused(base, "tp4"))
    guarded(results, "stock_tp2->tp4", dense(
        "stock_tp2", "tp4", UCPLoadPlanner(saved_patterns=dense_patterns(degree=2)), stock=True))
    guarded(results, "moe_ep2->ep4", moe("moe_ep2", "ep4"))
    guarded(results, "moe_ep2->items_dp4", moe("moe_ep2", "items_dp4"))
    guarded(results, "moe_items_dp4->ep4", moe("moe_items_dp4", "ep4"))
    guarded(results, "moe_items_dp4->ep2", moe("moe_items_dp4", "ep2"))
    return results


def run_distributed_cases(base: str) -> dict[str, Any]:
    run_saves(base)
    dist.barrier()
    return run_loads(base)


# -- one process, no process group ---------------------------------------------------------------
STAGE1 = Rename(r"layers\.(\d+)", lambda m: f"layers.{int(m[1]) + 1}")  # stage 1 holds layer 1 as 0


def run_local(base: str) -> dict[str, Any]:
    """One process, no process group: load the distributed checkpoints into plain tensors."""
    results: dict[str, Any] = {}

    def dense(source: str, planner: Any, **kw: Any) -> Callable[[], dict[str, Any]]:
        def case() -> dict[str, Any]:
            model, optims, tp = build_dense("plain", trained=False)
            return load_and_check("dense", model, optims, tp, os.path.join(base, source), planner,
                                  no_dist=True, **kw)
        return case

    def moe(source: str, target: str) -> Callable[[], dict[str, Any]]:
        def case() -> dict[str, Any]:
            model, optims, ep = build_moe(target, trained=False)
            return load_and_check("moe", model, optims, ep, os.path.join(base, source), UCPLoadPlanner(),
                                  no_dist=True)
        return case

    guarded(results, "dense_tp2_fsdp->plain", dense("dense_tp2_fsdp", UCPLoadPlanner()))
    guarded(results, "stock_tp2->plain", dense(
        "stock_tp2", UCPLoadPlanner(saved_patterns=dense_patterns(degree=2)), stock=True))
    guarded(results, "moe_ep2->plain_items", moe("moe_ep2", "plain_items"))
    guarded(results, "moe_ep2->plain_stacked", moe("moe_ep2", "plain_stacked"))
    guarded(results, "moe_items_dp4->plain_stacked", moe("moe_items_dp4", "plain_stacked"))

    def stage(index: int) -> Callable[[], dict[str, Any]]:
        """A pipeline stage of one layer, numbered locally: stage 0 (embeddings + layer 0) loads
        with the recorded patterns, stage 1 (layer 1 + head) with a function rename."""
        def case() -> dict[str, Any]:
            if index == 0:
                model, optims, tp = build_dense("plain", trained=False, head=False, n_layers=1)
                planner = UCPLoadPlanner(allow_partial_load=True)
                rename: Callable[[str], str] = lambda k: k  # noqa: E731
            else:
                model, optims, tp = build_dense("plain", trained=False, embeddings=False, n_layers=1,
                                                layer_offset=1)
                planner = UCPLoadPlanner(allow_partial_load=True,
                                         patterns=[STAGE1, *dense_patterns(embeddings=False)])
                rename = STAGE1.apply
            out = load_and_check("dense", model, optims, tp, os.path.join(base, "dense_tp2_fsdp"),
                                 planner, no_dist=True, rename=rename)
            if index == 1:  # save the stage under global names, then read it back into a full model
                path = os.path.join(base, "stage1")
                save(model, optims, path,
                     UCPSavePlanner(patterns=[STAGE1, *dense_patterns(embeddings=False)]), no_dist=True)
                full, full_optims, _ = build_dense("plain", trained=False)
                got = load_and_check("dense", full, full_optims, 1, path,
                                     UCPLoadPlanner(allow_partial_load=True), no_dist=True)
                layer1 = [p for p in got["problems"] if p.startswith(("layers.1.", "norm.", "output."))]
                out["checked"] += [f"stage1 save: {c}" for c in got["checked"]]
                out["problems"] += [f"stage1 save: {p}" for p in layer1]
            return out
        return case

    guarded(results, "dense_tp2_fsdp->stage0", stage(0))
    guarded(results, "dense_tp2_fsdp->stage1", stage(1))
    return results
