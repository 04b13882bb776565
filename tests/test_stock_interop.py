"""UCPSavePlanner with DCP's stock FileSystemWriter, and UCPLoadPlanner on stock checkpoints.

- ``dcp.save(sd, checkpoint_id=dir, planner=UCPSavePlanner())`` writes a checkpoint stock
  ``dcp.load`` reads bit-exactly (including the exact fragments of ``_StridedShard`` layouts),
  and it carries torch_ucp's fragment provenance as JSON inside ``Metadata.planner_data``.
- ``UCPLoadPlanner`` loads stock DCP checkpoints (stock planner, stock writer) into other layouts.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.support.matrix import load_layouts, save_layouts, state_for
from torch_ucp import UCPLoadPlanner, UCPSavePlanner
from torch_ucp.demo.launch import run_distributed
from torch_ucp.metadata.provenance import UCP_KEY


def _save_stock(base: str, layouts: list[str], use_ucp_planner: bool) -> None:
    from tests.support.matrix import _mesh

    for layout in layouts:
        mesh = _mesh(layout)
        planner = UCPSavePlanner() if use_ucp_planner else dcp.DefaultSavePlanner()
        dcp.save(state_for(layout, mesh, fill=True), checkpoint_id=f"{base}/{layout}",
                 planner=planner, no_dist=mesh is None)


def _load_with(base: str, saved: list[str], target: str, stock_planner: bool) -> dict:
    from tests.support.matrix import _mesh, check_state

    mesh = _mesh(target)
    out = {}
    for source in saved:
        state = state_for(target, mesh, fill=False)
        planner = dcp.DefaultLoadPlanner() if stock_planner else UCPLoadPlanner()
        dcp.load(state, checkpoint_id=f"{base}/{source}", planner=planner, no_dist=mesh is None)
        out[source] = check_state(state)
    return out


def test_ucp_planner_with_stock_writer_loads_with_stock_dcp(tmp_path):
    base = str(tmp_path)
    run_distributed(_save_stock, 4, base, ["ws4-2d", "ws4-fsdp-tp-strided"], True)
    # same layout, stock planner and stock reader
    for rank_result in run_distributed(_load_with, 4, base, ["ws4-2d", "ws4-fsdp-tp-strided"],
                                       "ws4-fsdp-tp-strided", True):
        assert rank_result == {"ws4-2d": [], "ws4-fsdp-tp-strided": []}
    # and in one plain process, stock planner
    assert _load_with(base, ["ws4-2d", "ws4-fsdp-tp-strided"], "ws1-plain", True) == {
        "ws4-2d": [], "ws4-fsdp-tp-strided": []
    }
    md = FileSystemReader(f"{base}/ws4-fsdp-tp-strided").read_metadata()
    info = json.loads(md.planner_data[UCP_KEY])  # JSON, no torch_ucp class in the pickle
    assert info["tensors"]["model.w_odd"]["placements"] == [
        {"kind": "strided_shard", "dim": 0, "split_factor": 2},
        {"kind": "shard", "dim": 0},
    ]
    chunks = md.state_dict_metadata["model.w_odd"].chunks
    assert len(info["tensors"]["model.w_odd"]["ranks"]) == len(chunks)
    assert sum(c.sizes.numel() for c in chunks) == 13 * 7


def test_ucp_load_planner_reshards_stock_checkpoints(tmp_path):
    base = str(tmp_path)
    run_distributed(_save_stock, 4, base, ["ws4-2d", "ws4-hsdp"], False)
    results = run_distributed(_load_with, 2, base, ["ws4-2d", "ws4-hsdp"], "ws2-shard1", False)
    for r in results:
        assert r == {"ws4-2d": [], "ws4-hsdp": []}
    assert _load_with(base, ["ws4-2d", "ws4-hsdp"], "ws1-plain", False) == {
        "ws4-2d": [], "ws4-hsdp": []
    }


def test_ucp_writer_checkpoint_is_loadable_by_matrix_helpers(tmp_path):
    # sanity: the UCPWriter path through the same helpers, one process
    save_layouts(str(tmp_path), ["ws1-plain"], {})
    res = load_layouts(str(tmp_path), ["ws1-plain"], ["ws1-plain"], {})
    assert res["ws1-plain->ws1-plain"]["problems"] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_process_stock_roundtrip_with_ucp_planners(tmp_path, dtype):
    sd = {"w": torch.randn(5, 3).to(dtype), "step": 3}
    dcp.save(sd, checkpoint_id=str(tmp_path), planner=UCPSavePlanner(), no_dist=True)
    target = {"w": torch.zeros(5, 3, dtype=dtype), "step": 0}
    dcp.load(target, checkpoint_id=str(tmp_path), planner=UCPLoadPlanner(), no_dist=True)
    assert torch.equal(target["w"], sd["w"]) and target["step"] == 3
