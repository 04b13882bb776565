"""Planning at scale without processes: a Llama-70B-shaped state on 1,024 and 8,192 ranks.

    python benchmarks/plan_scale.py [--ranks 1024 8192] [--tp 8] [--stock-max-ranks 256]

For FSDP x TP (TP colwise/rowwise, FSDP on dim 0, norms TP-replicated; AdamW ``exp_avg`` and
``exp_avg_sq`` per parameter and a replicated ``step``) it builds every rank's local plan summary
exactly as ``UCPSavePlanner.create_local_plan`` ships it (the catalog from real ``WriteItem``s
of rank 0, the per-rank columns from ``boxes_for``, the function the planner itself uses), then
times the coordinator:

- ``ucp global s``: ``UCPSavePlanner.create_global_plan`` on all ranks' plans, after they went
  through pickle as DCP's gather sends them (``gathered MB``: what the coordinator receives);
- ``meta MB``: the JSON torch_ucp adds to DCP's metadata (writer and coordinate of every
  fragment), and ``chunks``: unique fragments;
- ``load plan s``: one rank's ``UCPLoadPlanner.create_local_plan`` on that metadata, for a
  DTensor state on a *different* mesh (TP x 2, FSDP / 2), in a fake process group of the full
  world size (all ranks plan in parallel, so this is the latency);
- stock ``DefaultSavePlanner.create_global_plan`` on the same items as ``WriteItem`` lists, up to
  ``--stock-max-ranks`` (its items alone need ~1 KiB each: 24M of them do not fit in memory).
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import resource
import sys
import time

import numpy as np
import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor.placement_types import Replicate, Shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_ucp.planner.layout import boxes_for  # noqa: E402
from torch_ucp.planner.plan_table import LocalPlanTable, LocalTableBuilder, RankLocalItems  # noqa: E402
from torch_ucp.planner.provenance import UCP_KEY  # noqa: E402
from torch_ucp.planner.save_planner import UCPSavePlanner  # noqa: E402

DIM, FFN, VOCAB, LAYERS, KV = 8192, 28672, 128256, 80, 1024
TP_PLACEMENT = {"col": Shard(0), "row": Shard(1), "rep": Replicate()}


def llama70b_params() -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, tp style: "col", "row" or "rep")."""
    params: dict[str, tuple[tuple[int, ...], str]] = {
        "tok_embeddings.weight": ((VOCAB, DIM), "col"),
        "norm.weight": ((DIM,), "rep"),
        "output.weight": ((VOCAB, DIM), "col"),
    }
    for i in range(LAYERS):
        p = f"layers.{i}."
        params.update({
            p + "attention.wq.weight": ((DIM, DIM), "col"),
            p + "attention.wk.weight": ((KV, DIM), "col"),
            p + "attention.wv.weight": ((KV, DIM), "col"),
            p + "attention.wo.weight": ((DIM, DIM), "row"),
            p + "feed_forward.w1.weight": ((FFN, DIM), "col"),
            p + "feed_forward.w2.weight": ((DIM, FFN), "row"),
            p + "feed_forward.w3.weight": ((FFN, DIM), "col"),
            p + "attention_norm.weight": ((DIM,), "rep"),
            p + "ffn_norm.weight": ((DIM,), "rep"),
        })
    return params


def state_keys(params) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, style) of every saved tensor: params, AdamW moments, steps (style "step")."""
    out = []
    for name, (shape, style) in params.items():
        out.append((f"model.{name}", shape, style))
        out.append((f"optim.state.{name}.exp_avg", shape, style))
        out.append((f"optim.state.{name}.exp_avg_sq", shape, style))
        out.append((f"optim.state.{name}.step", (), "step"))
    return out


class SyntheticPlans:
    """Every rank's local plan for a (dp, tp) mesh, from per-(shape, style) box tables."""

    def __init__(self, ranks: int, tp: int, params) -> None:
        self.ranks, self.tp, self.dp = ranks, tp, ranks // tp
        self.keys = state_keys(params)
        shapes = sorted({(shape, style) for _, shape, style in self.keys if style != "step"})
        self._boxes = {s: self._box_table(*s) for s in shapes}

    def _box_table(self, shape, style) -> tuple[np.ndarray, np.ndarray]:
        """offsets, lengths [ranks, ndim] of the one box each rank holds."""
        placements = (Shard(0), TP_PLACEMENT[style])
        off = np.zeros((self.ranks, len(shape)), dtype=np.int64)
        length = np.zeros_like(off)
        for r in range(self.ranks):
            boxes = boxes_for(shape, (self.dp, self.tp), placements, (r // self.tp, r % self.tp))
            if boxes:  # else the rank's shard is empty (more ranks than rows): no item
                (box,) = boxes
                off[r], length[r] = box.global_offsets, box.lengths
        return off, length

    def items(self, rank: int) -> list[WriteItem]:
        """Rank ``rank``'s write items, as ``UCPSavePlanner`` makes them."""
        items = []
        bf16 = TensorProperties(dtype=torch.bfloat16)
        for key, shape, style in self.keys:
            if style == "step":
                chunk = ChunkStorageMetadata(torch.Size(()), torch.Size(()))
                data = TensorWriteData(chunk, TensorProperties(dtype=torch.float32), torch.Size(()))
                items.append(WriteItem(MetadataIndex(key, ()), WriteItemType.TENSOR, tensor_data=data))
                continue
            off, length = self._boxes[(shape, style)]
            o, n = torch.Size(off[rank].tolist()), torch.Size(length[rank].tolist())
            data = TensorWriteData(ChunkStorageMetadata(o, n), bf16, torch.Size(shape))
            items.append(WriteItem(MetadataIndex(key, o), WriteItemType.SHARD, tensor_data=data))
        return items

    def tables(self) -> list[LocalPlanTable]:
        """Every rank's table: rank 0's catalog (identical on every rank), per-rank columns."""
        builder = LocalTableBuilder()
        mesh = {"shape": [self.dp, self.tp], "dim_names": ["dp", "tp"]}
        layout_of = {}
        for key, _, style in self.keys:
            if style != "step":
                placements = [{"kind": "shard", "dim": 0}, _placement_json(TP_PLACEMENT[style])]
                layout_of[key] = builder.add_layout(mesh, placements, [0, 0])
        template = builder.build(self.items(0), layout_of, {k: k.split(".") for k, _, _ in self.keys})
        # One [shapes, ranks, ndim] table of boxes; row 0 is the scalar step (offset 0, length 1).
        kinds = [None, *self._boxes]
        box_off = np.zeros((len(kinds), self.ranks, template.ndim), dtype=np.int64)
        box_len = np.ones_like(box_off)
        for i, kind in enumerate(kinds[1:], 1):
            off, length = self._boxes[kind]
            box_off[i, :, : off.shape[1]], box_len[i, :, : off.shape[1]] = off, length
        kind_of = np.array([0 if style == "step" else kinds.index((shape, style))
                            for _, shape, style in self.keys])[template.key]
        itemsize = np.where(kind_of == 0, 4, 2)
        tables = []
        for r in range(self.ranks):
            lengths = box_len[kind_of, r]
            held = (kind_of == 0) | (lengths.prod(axis=1) > 0)
            coords = [[r // self.tp, r % self.tp] for _ in template.coordinates]
            tables.append(LocalPlanTable(template.catalog, template.digest, coords, template.key[held],
                                         box_off[kind_of, r][held], lengths[held],
                                         (lengths.prod(axis=1) * itemsize)[held]))
        return tables


def _placement_json(p) -> dict:
    return {"kind": "replicate"} if isinstance(p, Replicate) else {"kind": "shard", "dim": p.dim}


def load_plan_seconds(metadata, ranks: int, tp: int, params) -> float:
    """One rank's UCPLoadPlanner.create_local_plan for a (dp/2, 2*tp) DTensor state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torch_ucp import UCPLoadPlanner

    rank = ranks // 2 + 3
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
    try:
        mesh = init_device_mesh("cpu", (ranks // (2 * tp), 2 * tp), mesh_dim_names=("dp", "tp"))
        state = {}
        for key, shape, style in state_keys(params):
            if style == "step":
                state[key] = torch.zeros(())
                continue
            placements = (Shard(0), TP_PLACEMENT[style])
            boxes = boxes_for(shape, tuple(mesh.shape), placements, tuple(mesh.get_coordinate()))
            local = torch.empty(boxes[0].lengths if boxes else (0, *shape[1:]), dtype=torch.bfloat16)
            state[key] = DTensor.from_local(local, mesh, placements, run_check=False,
                                            shape=torch.Size(shape), stride=_contiguous_stride(shape))
        planner = UCPLoadPlanner()
        t0 = time.perf_counter()
        planner.set_up_planner(state, metadata, False)
        plan = planner.create_local_plan()
        seconds = time.perf_counter() - t0
        assert plan.items, "the load plan reads nothing"
        return seconds
    finally:
        dist.destroy_process_group()


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= n
    return tuple(reversed(out))


def stock_global_seconds(synthetic: SyntheticPlans) -> tuple[float, float]:
    plans = [SavePlan(synthetic.items(r), planner_data={}) for r in range(synthetic.ranks)]
    gathered = sum(len(pickle.dumps(p)) for p in plans) / 1e6
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, None, True)
    t0 = time.perf_counter()
    planner.create_global_plan(plans)
    return time.perf_counter() - t0, gathered


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--stock-max-ranks", type=int, default=256,
                   help="run stock DefaultSavePlanner only up to this many ranks (default 256)")
    p.add_argument("--no-load", action="store_true", help="skip the load-planning column")
    args = p.parse_args()
    params = llama70b_params()
    print(f"Llama-70B shape: {len(params)} parameters -> {4 * len(params)} saved tensors per rank "
          f"(model, exp_avg, exp_avg_sq, step); FSDP x TP={args.tp}; torch {torch.__version__}")
    head = (f"{'ranks':>6} {'items':>10} {'gathered MB':>11} {'ucp global s':>12} {'chunks':>9} "
            f"{'meta MB':>8} {'load plan s':>11} {'dcp gathered MB':>15} {'dcp global s':>12}")
    print(head)
    print("-" * len(head))
    for ranks in args.ranks:
        synthetic = SyntheticPlans(ranks, args.tp, params)
        tables = synthetic.tables()
        wire = [pickle.dumps(SavePlan(RankLocalItems(), planner_data=t)) for t in tables]
        del tables
        gathered = sum(len(w) for w in wire) / 1e6
        gc.collect()
        t0 = time.perf_counter()
        plans = [pickle.loads(w) for w in wire]
        del wire
        planner = UCPSavePlanner()
        planner.set_up_planner({}, None, True)
        _, metadata = planner.create_global_plan(plans)
        ucp_s = time.perf_counter() - t0
        n_items = sum(len(pl.planner_data) for pl in plans)
        del plans
        chunks = len(metadata.state_dict_metadata.fragments.writer)
        meta_mb = len(metadata.planner_data[UCP_KEY]) / 1e6
        load_s = float("nan") if args.no_load else load_plan_seconds(metadata, ranks, args.tp, params)
        if ranks <= args.stock_max_ranks:
            dcp_s, dcp_mb = stock_global_seconds(synthetic)
            stock = f"{dcp_mb:>15.1f} {dcp_s:>12.2f}"
        else:
            stock = f"{'skipped':>15} {'skipped':>12}"
        print(f"{ranks:>6} {n_items:>10} {gathered:>11.1f} {ucp_s:>12.2f} {chunks:>9} {meta_mb:>8.1f} "
              f"{load_s:>11.2f} {stock}", flush=True)
        del metadata, synthetic
        gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
