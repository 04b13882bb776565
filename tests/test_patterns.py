"""Patterns (issue 5): fused, padded, stacked and renamed parameters reshard bit-exactly, with
every optimizer state (AdamW, SGD momentum, a custom-named state), across TP / FSDP / EP degrees.

One 4-process gloo run saves every source checkpoint and loads it into every distributed target;
the pytest process then loads the same checkpoints with no process group. Every value is compared
with the logical (unsharded) reference trained the same way, transformed into the target's
layout (tests/support/patterns_models.py). Unit tests cover the index maps, globs and the strict
errors. The failure mode guarded against: pytorch#149701, Megatron-LM#2769 (fused QKV scrambled
by a TP change), DeepSpeed#8608 (only Adam's state names known), DeepSpeed#5716 (MoE).
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tests.support import patterns_models as pm
from torch_ucp import (
    CheckpointNotFoundError,
    LoadPlanError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    open_checkpoint,
)
from torch_ucp.demo.launch import run_distributed
from torch_ucp.patterns import (
    FusedParam,
    PaddedParam,
    Pattern,
    PatternError,
    PatternSet,
    Rename,
    Segment,
    StackedParam,
)
from torch_ucp.patterns.base import glob_regex
from torch_ucp.patterns.engine import map_box
from torch_ucp.planner.layout import Box

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ==============================================================================================
# multi-process: one run, many cases
# ==============================================================================================
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("patterns"))


@pytest.fixture(scope="module")
def results(ckpts) -> dict:
    """``{case: {"checked": [labels], "problems": [...]}}``, problems merged over ranks."""
    per_rank = run_distributed(pm.run_distributed_cases, 4, ckpts)
    out = {
        case: {
            "checked": per_rank[0][case]["checked"],
            "problems": sorted({p for r in per_rank for p in r[case]["problems"]}),
        }
        for case in per_rank[0]
    }
    out.update(pm.run_local(ckpts))
    return out


def labels(kind: str, items: bool = False) -> set[str]:
    """Every tensor a full target holds: ``<fqn>:param`` and ``<fqn>:<optimizer state>``."""
    out = set()
    for key, value in pm.reference(kind).items():
        parsed = pm.split_key(key)
        if parsed is None or not isinstance(value, torch.Tensor):
            continue
        fqn, state = parsed
        names = [fqn]
        if items and ".experts.w" in fqn:
            names = [fqn.replace(".experts.", f".experts.{i}.") for i in range(pm.N_EXPERTS)]
        out.update(f"{n}:{state or 'param'}" for n in names)
    return out


# every state of every patterned parameter: AdamW, SGD momentum and the custom SignEMA state
FUSED = {
    "layers.0.attention.wqkv.weight:param",
    "layers.0.attention.wqkv.weight:exp_avg",
    "layers.0.attention.wqkv.weight:exp_avg_sq",
    "layers.0.attention.wqkv.weight:step",
    "layers.1.attention.wqkv.weight:param",
    "layers.1.attention.wqkv.weight:momentum_buffer",
    "layers.0.feed_forward.w13.weight:param",
    "layers.0.feed_forward.w13.weight:exp_avg",
    "layers.0.feed_forward.w13.weight:exp_avg_sq",
    "layers.1.feed_forward.w13.weight:param",
    "layers.1.feed_forward.w13.weight:sign_ema",
}
PADDED = {
    f"{name}:{state}"
    for name in ("tok_embeddings.weight", "output.weight")
    for state in ("param", "exp_avg", "exp_avg_sq", "step")
}

DENSE_CASES = {
    # case: what it shows
    "dense_tp2_fsdp->tp4": "FSDP2 x TP=2 (_StridedShard) -> TP=4, recorded patterns",
    "dense_tp2_fsdp->dp4": "TP=2 + FSDP -> TP=1 (FSDP only)",
    "dense_tp2_fsdp->tp2": "TP=2 + FSDP -> TP=2 without FSDP",
    "dense_tp2_fsdp->tp2_fsdp": "same layout, explicit patterns=",
    "dense_tp4->tp2_fsdp": "TP=4 -> TP=2 + FSDP on the same dim",
    "dense_tp2_fsdp->plain": "one process, no process group: the logical model",
    "dense_orig_mod->tp4": "saved with Rename('_orig_mod.'): loads into plain names",
    "dense_tp2_fsdp->module.tp4": "target with a 'module.' prefix, Rename at load",
    "stock_tp2->tp4": "stock DCP checkpoint, saved_patterns (degree=2) -> TP=4",
    "stock_tp2->plain": "stock DCP checkpoint, saved_patterns -> one process",
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_dense_bit_exact(results, case):
    r = results[case]
    assert r["problems"] == []
    # every parameter and every optimizer state of the model was compared, fused/padded ones too
    assert set(r["checked"]) == labels("dense")
    assert FUSED | PADDED <= set(r["checked"])


MOE_CASES = {
    "moe_ep2->ep4": (False, "stacked EP=2 (+FSDP on dim 1) -> stacked EP=4"),
    "moe_ep2->items_dp4": (True, "stacked EP=2 -> per-item, FSDP"),
    "moe_ep2->plain_items": (True, "stacked EP=2 -> per-item in one process"),
    "moe_ep2->plain_stacked": (False, "stacked EP=2 -> stacked in one process"),
    "moe_items_dp4->ep4": (False, "per-item -> stacked EP=4"),
    "moe_items_dp4->ep2": (False, "per-item -> stacked EP=2 (+FSDP)"),
    "moe_items_dp4->plain_stacked": (False, "per-item -> stacked in one process"),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_experts_bit_exact(results, case):
    items, _ = MOE_CASES[case]
    r = results[case]
    assert r["problems"] == []
    assert set(r["checked"]) == labels("moe", items=items)
    expert = "layers.0.moe.experts.3.w1" if items else "layers.0.moe.experts.w1"
    for state in ("param", "exp_avg", "exp_avg_sq", "step"):
        assert f"{expert}:{state}" in r["checked"]
    assert f"{expert.replace('layers.0', 'layers.1')}:sign_ema" in r["checked"]


def test_pipeline_stages_with_local_layer_numbers(results):
    """Stage 0 (embeddings + layer 0) loads with the recorded patterns, which are applied where
    they match (the head's PaddedParam matches nothing there); stage 1 (layer 1 numbered 0 +
    head) with a function Rename; stage 1 saved under global names and read back."""
    stage0, stage1 = results["dense_tp2_fsdp->stage0"], results["dense_tp2_fsdp->stage1"]
    assert stage0["problems"] == []
    assert stage1["problems"] == []
    assert {c for c in stage0["checked"] if not c.startswith("layers.")} == {
        f"tok_embeddings.weight:{s}" for s in ("param", "exp_avg", "exp_avg_sq", "step")
    }
    assert "layers.0.attention.wqkv.weight:exp_avg" in stage0["checked"]
    assert "layers.1.attention.wqkv.weight:momentum_buffer" in stage1["checked"]
    assert "layers.1.feed_forward.w13.weight:sign_ema" in stage1["checked"]
    assert "output.weight:exp_avg" in stage1["checked"]
    assert not [c for c in stage1["checked"] if c.startswith("layers.0.")]
    assert "stage1 save: layers.1.attention.wqkv.weight:param" in stage1["checked"]


def test_stock_dcp_scrambles_fused_tp_change_torch_ucp_does_not(results):
    """The same stock TP=2 checkpoint: stock DCP loads it right at TP=2, wrong at TP=4 (every
    fused parameter and optimizer state differs), torch_ucp with saved_patterns right."""
    same = results["stock_tp2->tp2 (stock dcp)"]
    assert same["problems"] == [] and len(same["checked"]) == 10
    wrong = results["stock_tp2->tp4 (stock dcp)"]
    assert len(wrong["checked"]) == 10
    assert wrong["problems"] == sorted(f"{c}: values differ" for c in wrong["checked"])
    assert FUSED - {c for c in FUSED if c.endswith(":step")} == set(wrong["checked"])
    assert results["stock_tp2->tp4"]["problems"] == []


def test_open_checkpoint_reads_logical_tensors(results, ckpts):
    """The stored tensors are the logical ones: plain concatenation, no padding, either form."""
    ref = pm.reference("dense")
    ckpt = open_checkpoint(os.path.join(ckpts, "dense_tp2_fsdp"))
    for key in (
        "model.layers.0.attention.wqkv.weight",
        "optim.state.layers.0.attention.wqkv.weight.exp_avg_sq",
        "optim.state.layers.1.attention.wqkv.weight.momentum_buffer",
        "optim.state.layers.1.feed_forward.w13.weight.sign_ema",
        "model.output.weight",
        "optim.state.tok_embeddings.weight.exp_avg",
    ):
        got = ckpt.read(key)
        assert torch.equal(got, ref[key]), key
    assert tuple(ckpt.shape("model.output.weight")) == (pm.VOCAB, pm.DIM)
    assert ckpt.metadata.patterns == [p.to_json() for p in pm.dense_patterns()]
    # q, k and v are the first/next/last rows of the logical fused weight
    q, k, v = ckpt.read("model.layers.0.attention.wqkv.weight").split(pm.QKV_PARTS)
    assert torch.equal(k, ref["model.layers.0.attention.wqkv.weight"][pm.QKV_PARTS[0] : -pm.QKV_PARTS[2]])

    moe = pm.reference("moe")
    stacked = open_checkpoint(os.path.join(ckpts, "moe_ep2"))
    items = open_checkpoint(os.path.join(ckpts, "moe_items_dp4"))
    key = "optim.state.layers.0.moe.experts.w1.exp_avg"
    assert torch.equal(stacked.read(key), moe[key])
    for i in range(pm.N_EXPERTS):
        item_key = f"optim.state.layers.0.moe.experts.{i}.w1.exp_avg"
        assert torch.equal(items.read(item_key), moe[key][i])
    # the recorded function rename: stage 1 saved its local layer 0 as global layer 1
    stage1 = open_checkpoint(os.path.join(ckpts, "stage1"))
    assert "model.layers.1.attention.wqkv.weight" in stage1
    assert "model.layers.0.attention.wqkv.weight" not in stage1
    assert stage1.metadata.patterns[0] == {"kind": "rename", "pattern": r"layers\.(\d+)", "replacement": "<function>"}


# ==============================================================================================
# one process: strict errors through the planners
# ==============================================================================================
def _error(exc_type: type[BaseException], fn) -> str:
    """The message of the planning error ``fn`` raises (DCP wraps it in a CheckpointException)."""
    with pytest.raises((CheckpointException, exc_type)) as e:
        fn()
    err = pm.unwrap(e.value)
    assert isinstance(err, exc_type), repr(err)
    return str(err)


def _load_plain(path: str, planner, stock: bool = False):
    def load() -> None:
        model, optims, _ = pm.build_dense("plain", trained=False)
        pm.load_and_check("dense", model, optims, 1, path, planner, stock=stock, no_dist=True)
    return load


def test_saved_patterns_for_stock_checkpoint_need_degree(results, ckpts):
    planner = UCPLoadPlanner(saved_patterns=pm.dense_patterns())
    msg = _error(LoadPlanError, _load_plain(os.path.join(ckpts, "stock_tp2"), planner, stock=True))
    assert re.search(r"layers\.\d\.(attention\.wqkv|feed_forward\.w13)\.weight: saved_patterns FusedParam\(.*needs degree=", msg), msg


def test_parts_not_divisible_by_degree_names_parameter_and_numbers(results, ckpts):
    planner = UCPLoadPlanner(saved_patterns=pm.dense_patterns(degree=3))
    msg = _error(LoadPlanError, _load_plain(os.path.join(ckpts, "stock_tp2"), planner, stock=True))
    assert re.search(
        r"layers\.\d\.attention\.wqkv\.weight(\.\w+)?: cannot interleave parts \[32, 16, 16\] over tp degree 3: "
        r"parts \[32, 16, 16\] are not divisible by 3", msg), msg


def test_unused_explicit_pattern_at_load_is_an_error(results, ckpts):
    planner = UCPLoadPlanner(patterns=[*pm.dense_patterns(), PaddedParam("lm_head.weight", 61)])
    msg = _error(LoadPlanError, _load_plain(os.path.join(ckpts, "dense_tp2_fsdp"), planner))
    assert "patterns matched nothing in the target state dict: [PaddedParam('lm_head.weight', size=61, dim=0)]" in msg


def _save_plain(path: str, patterns):
    def save() -> None:
        model, optims, _ = pm.build_dense("plain", trained=True)
        pm.save(model, optims, path, UCPSavePlanner(patterns=patterns), no_dist=True)
    return save


def test_unused_pattern_at_save_is_an_error(tmp_path):
    patterns = [*pm.dense_patterns(), FusedParam("layers.*.attention.qkv_proj.weight", (32, 16, 16))]
    msg = _error(PatternError, _save_plain(str(tmp_path / "c"), patterns))
    assert msg == (
        "patterns matched nothing in the state dict being saved: "
        "[FusedParam('layers.*.attention.qkv_proj.weight', parts=[32, 16, 16], dim=0, mesh_dim='tp')]"
    )
    with pytest.raises(CheckpointNotFoundError):
        open_checkpoint(str(tmp_path / "c"))


def test_two_patterns_on_one_fqn_is_an_error(tmp_path):
    patterns = [*pm.dense_patterns(), PaddedParam("layers.*.attention.wqkv.weight", 60)]
    msg = _error(PatternError, _save_plain(str(tmp_path / "c"), patterns))
    assert "layers.0.attention.wqkv.weight: claimed by several patterns" in msg
    assert "FusedParam('layers.*.attention.wqkv.weight'" in msg
    assert "PaddedParam('layers.*.attention.wqkv.weight', size=60, dim=0)" in msg


def test_renames_onto_one_name_is_an_error(tmp_path):
    state = {"model": {"a.w": torch.ones(2), "b.w": torch.zeros(2)}}
    planner = UCPSavePlanner(patterns=[Rename(r"\.[ab]\.", ".x.")])
    msg = _error(PatternError, lambda: dcp.save(
        state, storage_writer=UCPWriter(str(tmp_path / "c")), planner=planner, no_dist=True))
    assert msg == "renames map several keys to one name: ['model.a.w', 'model.b.w']"


def test_padded_param_loads_zero_padding(tmp_path):
    """Plain tensors, one process: a vocabulary saved unpadded (61 rows) loads into 64 rows with
    the padding zeroed (the target's padding held garbage), and back."""
    ref = pm.seeded("vocab", (pm.VOCAB, 4))
    path = str(tmp_path / "v")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"emb": torch.cat([ref, torch.full((3, 4), 9.0)])}, storage_writer=UCPWriter(path),
                 planner=UCPSavePlanner(patterns=[PaddedParam("emb", pm.VOCAB)]), no_dist=True)
        assert torch.equal(open_checkpoint(path).read("emb"), ref)
        target = {"emb": torch.full((64, 4), 5.0)}
        dcp.load(target, storage_reader=UCPReader(path), planner=UCPLoadPlanner(), no_dist=True)
    assert torch.equal(target["emb"], torch.cat([ref, torch.zeros(3, 4)]))


def test_degree_describes_plain_tensors_and_is_not_imposed_on_targets(tmp_path):
    """A plain tensor holding the TP=2 interleave (``full_tensor()`` of the TP=2 model) saved with
    ``degree=2`` is stored logical; the recorded degree does not apply to a load target (a plain
    target is logical), an explicit ``degree=2`` at load rebuilds the TP=2 interleave."""
    logical = pm.seeded("qkv", (sum(pm.QKV_PARTS), 3))
    physical = pm.interleave(logical, pm.QKV_PARTS, 2)
    path = str(tmp_path / "d")
    fused = FusedParam(pm.QKV, pm.QKV_PARTS, degree=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"layers.0.attention.wqkv.weight": physical}}, storage_writer=UCPWriter(path),
                 planner=UCPSavePlanner(patterns=[fused]), no_dist=True)
        assert torch.equal(open_checkpoint(path).read("model.layers.0.attention.wqkv.weight"), logical)
        assert open_checkpoint(path).metadata.patterns[0]["degree"] == 2
        recorded = {"model": {"layers.0.attention.wqkv.weight": torch.zeros_like(logical)}}
        dcp.load(recorded, storage_reader=UCPReader(path), planner=UCPLoadPlanner(), no_dist=True)
        explicit = {"model": {"layers.0.attention.wqkv.weight": torch.zeros_like(logical)}}
        dcp.load(explicit, storage_reader=UCPReader(path), planner=UCPLoadPlanner(patterns=[fused]), no_dist=True)
    assert torch.equal(recorded["model"]["layers.0.attention.wqkv.weight"], logical)
    assert torch.equal(explicit["model"]["layers.0.attention.wqkv.weight"], physical)


# ==============================================================================================
# unit: index maps, globs, renames, JSON
# ==============================================================================================
def test_fused_index_map_matches_the_picture():
    """parts (q=4, k=2, v=2), T=2: physical q0 q1 k0 v0 | q2 q3 k1 v1, logical q0..q3 k0 k1 v0 v1."""
    dmap = FusedParam("w", (4, 2, 2)).dim_map("w", (8, 3), 2)
    assert dmap.segments == (
        Segment(0, 0, 2), Segment(2, 4, 1), Segment(3, 6, 1),
        Segment(4, 2, 2), Segment(6, 5, 1), Segment(7, 7, 1),
    )
    logical = torch.arange(8)
    physical = pm.interleave(logical, (4, 2, 2), 2)
    assert physical.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    for seg in dmap.segments:
        assert torch.equal(physical[seg.physical : seg.physical + seg.length],
                           logical[seg.logical : seg.logical + seg.length])


@pytest.mark.parametrize("parts", [pm.QKV_PARTS, pm.GATE_UP_PARTS, (12, 4, 4)])
@pytest.mark.parametrize("degree", [1, 2, 4])
def test_fused_index_map_inverts_interleave(parts, degree):
    total = sum(parts)
    logical = torch.arange(total)
    physical = pm.interleave(logical, parts, degree)
    dmap = FusedParam("w", parts).dim_map("w", (total,), degree)
    rebuilt = torch.empty_like(logical)
    for lo, n, ph in dmap.to_logical(0, total):
        rebuilt[lo : lo + n] = physical[ph : ph + n]
    assert torch.equal(rebuilt, logical)
    for ph, n, lo in dmap.to_physical(0, total):
        assert torch.equal(physical[ph : ph + n], logical[lo : lo + n])


def test_map_box_fsdp_shard_of_a_fused_rank_block():
    """Physical rows 1..2 of (q=4, k=2, v=2) at T=2 (an uneven FSDP shard of TP rank 0's
    block ``q0 q1 k0 v0``) are q1 and k0: logical rows 1 and 4, at local rows 0 and 1."""
    dmap = FusedParam("w", (4, 2, 2)).dim_map("w", (8, 5), 2)
    boxes, padding = map_box(Box((1, 0), (2, 5), (0, 0)), dmap)
    assert boxes == [Box((1, 0), (1, 5), (0, 0)), Box((4, 0), (1, 5), (1, 0))]
    assert padding == []


def test_padded_index_map_and_padding_ranges():
    dmap = PaddedParam("emb", 6).dim_map("emb", (8, 2))
    assert (dmap.physical_size, dmap.logical_size) == (8, 6)
    # TP=2 rank 1 holds physical rows 4..7: real rows 4, 5 and two padding rows
    boxes, padding = map_box(Box((4, 0), (4, 2), (0, 0)), dmap)
    assert boxes == [Box((4, 0), (2, 2), (0, 0))]
    assert padding == [(2, 2)]
    with pytest.raises(PatternError, match=r"emb: .*needs at least 6 entries along dim 0.*\[5, 2\]"):
        PaddedParam("emb", 6).dim_map("emb", (5, 2))


def test_fused_errors_name_parameter_and_numbers():
    p = FusedParam(pm.QKV, (12, 2, 2))
    with pytest.raises(PatternError) as e:
        p.dim_map("model.layers.3.attention.wqkv.weight", (16, 8), 4)
    assert str(e.value) == (
        "model.layers.3.attention.wqkv.weight: cannot interleave parts [12, 2, 2] over tp degree 4: "
        "parts [2, 2] are not divisible by 4"
    )
    with pytest.raises(PatternError, match=r"expects size 16 .* shape \[15, 8\]"):
        p.dim_map("w", (15, 8), 1)


@pytest.mark.parametrize(
    "key, matches",
    [
        ("model.layers.0.attention.wqkv.weight", True),
        ("layers.11.attention.wqkv.weight", True),
        ("optim.state.layers.0.attention.wqkv.weight.exp_avg", True),
        ("optim.state.layers.0.attention.wqkv.weight.exp_avg_sq", True),
        ("optim.state.layers.1.attention.wqkv.weight.momentum_buffer", True),
        ("optim.state.layers.1.attention.wqkv.weight.sign_ema", True),
        ("optim.state.layers.1.attention.wqkv.weight.step", True),
        ("model.layers.0.attention.wqkv.weight_scale", False),
        ("model.layers.0.attention.wqkv.bias", False),
        ("model.xlayers.0.attention.wqkv.weight", False),
        ("model.layers.0.extra.attention.wqkv.weight", False),
        ("optim.state.layers.0.attention.wqkv.weight.exp_avg.x", False),
    ],
)
def test_glob_matches_param_and_every_optimizer_state(key, matches):
    assert bool(glob_regex(pm.QKV).match(key)) is matches


def test_glob_double_star_and_item_component():
    assert glob_regex("**.experts.w1").match("model.layers.3.moe.experts.w1")
    assert glob_regex("**.experts.w1").match("optim.state.moe.experts.w1.exp_avg")
    assert not glob_regex("**.experts.w1").match("model.layers.3.moe.experts.0.w1")
    with pytest.raises(PatternError, match=r"\{i\} is only allowed in StackedParam"):
        glob_regex("experts.{i}.w1")
    with pytest.raises(PatternError, match=r"needs an \{i\} component"):
        StackedParam("experts.w1", "experts.w1_item")


def test_stacked_names_both_ways():
    p = StackedParam("layers.*.moe.experts.w1", "layers.*.moe.experts.{i}.w1")
    assert p.match_item("optim.state.layers.2.moe.experts.7.w1.exp_avg") == (
        "optim.state.layers.2.moe.experts.w1.exp_avg", 7)
    assert p.match_item("model.layers.2.moe.experts.w1") is None
    assert p.match_stacked("model.layers.2.moe.experts.w1")
    assert not p.match_stacked("model.layers.2.moe.experts.7.w1")
    assert p.item_key("optim.state.layers.2.moe.experts.w1.momentum_buffer", 5) == (
        "optim.state.layers.2.moe.experts.5.w1.momentum_buffer")
    deep = StackedParam("**.experts.w1", "**.experts.{i}.w1")
    assert deep.item_key("model.a.b.experts.w1", 3) == "model.a.b.experts.3.w1"
    assert deep.match_item("model.a.b.experts.3.w1") == ("model.a.b.experts.w1", 3)


def test_rename_with_function_replacement():
    offset = Rename(r"layers\.(\d+)", lambda m: f"layers.{int(m[1]) + 4}")
    assert offset.apply("optim.state.layers.0.attention.wqkv.weight.exp_avg") == (
        "optim.state.layers.4.attention.wqkv.weight.exp_avg")
    assert offset.apply("model.layers.12.w") == "model.layers.16.w"
    assert offset.to_json() == {"kind": "rename", "pattern": r"layers\.(\d+)", "replacement": "<function>"}
    s = PatternSet([Rename(r"_orig_mod\.", ""), offset])
    assert s.rename("model._orig_mod.layers.1.w") == "model.layers.5.w"
    s.check_used("x")  # both matched
    unused = PatternSet([Rename(r"^module\.", "")])
    unused.rename("model.w")
    with pytest.raises(PatternError, match=r"matched nothing in the target: \[Rename"):
        unused.check_used("the target")


def test_patterns_round_trip_through_json():
    patterns = [*pm.dense_patterns(), *pm.moe_patterns(), Rename(r"^module\.", ""), FusedParam("w", (2, 2), degree=2)]
    for p in patterns:
        again = Pattern.from_json(p.to_json())
        assert type(again) is type(p) and again.to_json() == p.to_json()
    with pytest.raises(PatternError, match="unknown pattern kind 'nope'"):
        Pattern.from_json({"kind": "nope"})


def test_pattern_set_strictness_and_claims():
    qkv, pad = FusedParam(pm.QKV, pm.QKV_PARTS), PaddedParam("output.weight", pm.VOCAB)
    s = PatternSet([qkv, pad])
    assert s.dim_pattern("model.layers.0.attention.wqkv.weight") is qkv
    assert s.dim_pattern("model.norm.weight") is None
    with pytest.raises(PatternError, match=re.escape("matched nothing in here: [PaddedParam('output.weight'")):
        s.check_used("here")
    PatternSet([pad], strict=False).check_used("here")  # not strict: no error
    stacked = PatternSet(pm.moe_patterns())
    stacked.note_stacked("model.layers.0.moe.experts.2.w1")
    stacked.note_stacked("model.layers.0.moe.experts.w2")
    stacked.check_used("both forms count as a match")
