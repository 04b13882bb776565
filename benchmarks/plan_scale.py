"""Planning at scale without processes: synthetic local plans of a Llama-70B-shaped state.

    python benchmarks/plan_scale.py --ranks 256 1024 [--tp 8]

Every rank's local plan is built as ``UCPSavePlanner.create_local_plan`` would build it for an
FSDP x TP layout (TP Colwise/Rowwise + FSDP dim-0 sharding, norms TP-replicated, AdamW
exp_avg/exp_avg_sq per parameter and a replicated ``step``), then the coordinator's
``create_global_plan`` runs on all of them; stock ``DefaultSavePlanner`` plans the same items.
Reports seconds and metadata size (JSON for torch_ucp, pickle for stock).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import pickle
import sys
import time

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor.placement_types import Replicate, Shard

from torch_ucp.planner.layout import boxes_for
from torch_ucp.planner.save_planner import UCPSavePlanner

DIM, FFN, VOCAB, LAYERS, KV = 8192, 28672, 128256, 80, 1024


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


def local_plan(rank: int, ranks: int, tp: int, params) -> SavePlan:
    dp = ranks // tp
    coord = (rank // tp, rank % tp)
    props = TensorProperties(dtype=torch.bfloat16)
    items = []
    for name, (shape, style) in params.items():
        tp_p = {"col": Shard(0), "row": Shard(1), "rep": Replicate()}[style]
        placements = (Shard(0), tp_p)  # FSDP dim 0 (strided where TP also shards dim 0)
        for key in (f"model.{name}", f"optim.state.{name}.exp_avg", f"optim.state.{name}.exp_avg_sq"):
            for box in boxes_for(shape, (dp, tp), placements, coord):
                chunk = ChunkStorageMetadata(torch.Size(box.global_offsets), torch.Size(box.lengths))
                items.append(WriteItem(MetadataIndex(key, box.global_offsets), WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk, props, torch.Size(shape))))
        step = f"optim.state.{name}.step"
        items.append(WriteItem(MetadataIndex(step, (0,)), WriteItemType.TENSOR, tensor_data=TensorWriteData(
            ChunkStorageMetadata(torch.Size((0,)), torch.Size(())), TensorProperties(dtype=torch.float32), torch.Size(()))))
    return SavePlan(items, planner_data={"mappings": {}, "layouts": {}})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--tp", type=int, default=8)
    args = p.parse_args()
    params = llama70b_params()
    print(f"{len(params)} parameters, {3 * len(params)} sharded tensors + {len(params)} steps")
    print(f"{'ranks':>6} {'items':>10} {'build s':>8} {'ucp global s':>13} {'ucp meta MB':>12} "
          f"{'dcp global s':>13} {'dcp meta MB':>12}")
    for ranks in args.ranks:
        t0 = time.perf_counter()
        plans = [local_plan(r, ranks, args.tp, params) for r in range(ranks)]
        build = time.perf_counter() - t0
        n_items = sum(len(pl.items) for pl in plans)
        gc.collect()
        t0 = time.perf_counter()
        _, meta = UCPSavePlanner().create_global_plan(plans)
        ucp_s = time.perf_counter() - t0
        from torch_ucp.storage.writer import build_checkpoint_metadata  # noqa: F401 - size below
        ucp_mb = len(pickle.dumps(meta.planner_data)) / 1e6  # JSON string inside
        stock_plans = [dataclasses.replace(pl, planner_data={}) for pl in plans]
        t0 = time.perf_counter()
        stock = DefaultSavePlanner()
        stock.set_up_planner({}, None, True)
        _, smeta = stock.create_global_plan(stock_plans)
        dcp_s = time.perf_counter() - t0
        dcp_mb = len(pickle.dumps(smeta)) / 1e6
        print(f"{ranks:>6} {n_items:>10} {build:>8.1f} {ucp_s:>13.2f} {ucp_mb:>12.1f} {dcp_s:>13.2f} {dcp_mb:>12.1f}",
              flush=True)
        del plans, stock_plans, meta, smeta
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
