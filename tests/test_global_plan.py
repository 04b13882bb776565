"""The coordinator's columnar save planning: what crosses the wire, dedup, writers, errors.

Local plans come from real ``UCPSavePlanner.create_local_plan`` calls (one planner per simulated
rank, plain and replicated tensors) or from real DCP ``WriteItem``s for layouts a state dict
cannot express in one process (overlaps, gaps, disagreeing ranks).
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from torch_ucp import SavePlanError, UCPSavePlanner
from torch_ucp.metadata.provenance import SaveInfo
from torch_ucp.planner.plan_table import LocalPlanTable, WriterAssignment


def _local_plans(states: list[dict]) -> tuple[list[UCPSavePlanner], list[SavePlan]]:
    planners, plans = [], []
    for rank, state in enumerate(states):
        planner = UCPSavePlanner()
        planner.set_up_planner(state, None, rank == 0)
        plans.append(planner.create_local_plan())
        planners.append(planner)
    return planners, plans


def _item(fqn: str, offsets, lengths, size, dtype=torch.float32) -> WriteItem:
    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(lengths))
    data = TensorWriteData(chunk, TensorProperties(dtype=dtype), torch.Size(size))
    return WriteItem(MetadataIndex(fqn, torch.Size(offsets)), WriteItemType.SHARD, tensor_data=data)


def _global(plans: list[SavePlan]):
    planner = UCPSavePlanner()
    planner.set_up_planner({}, None, True)
    return planner.create_global_plan(plans)


def test_items_stay_on_their_rank_and_come_back_after_planning():
    state = {"w": torch.randn(8, 4), "b": torch.randn(4), "step": 3, "name": "run-1"}
    planners, plans = _local_plans([state, dict(state)])
    wire = [pickle.loads(pickle.dumps(p)) for p in plans]  # what DCP's gather delivers
    assert all(p.items == [] and isinstance(p.planner_data, LocalPlanTable) for p in wire)
    assert len(pickle.dumps(plans[0])) < 4096
    new_plans, metadata = _global(wire)
    assert all(isinstance(p.planner_data, WriterAssignment) for p in new_plans)
    back = [pickle.loads(pickle.dumps(p)) for p in new_plans]  # DCP's scatter
    final = [planner.finish_plan(p) for planner, p in zip(planners, back)]
    written = sorted(i.index.fqn for p in final for i in p.items)
    assert written == ["b", "name", "step", "w"]  # every replicated key written exactly once
    assert all(p.planner_data is None for p in final)
    md = metadata.state_dict_metadata
    assert set(md) == {"w", "b", "step", "name"}
    assert isinstance(md["step"], BytesStorageMetadata)
    assert md["w"].size == torch.Size([8, 4]) and [c.sizes for c in md["w"].chunks] == [torch.Size([8, 4])]
    restored = pickle.loads(pickle.dumps(metadata))  # a stock writer pickles it: plain dicts
    assert type(restored.state_dict_metadata) is dict and type(restored.state_dict_metadata["w"].chunks) is list
    assert restored.state_dict_metadata["w"] == md["w"]


def test_replicated_fragments_balance_bytes_over_holders():
    state = {f"t{i}": torch.zeros(1000 * (i + 1)) for i in range(8)}
    _, plans = _local_plans([state, state, state])
    new_plans, metadata = _global(plans)
    per_rank = [int(p.planner_data.keep.sum()) for p in new_plans]
    assert sum(per_rank) == 8 and min(per_rank) >= 2
    loads = [0, 0, 0]
    layout = metadata.planner_data.layout  # what UCPWriter commits
    for name in state:
        (writer,) = layout.tensors[name].writers
        loads[writer] += state[name].numel()
    assert max(loads) - min(loads) <= 8000  # largest-first greedy: within one item


def test_sharded_items_from_many_ranks_are_sorted_and_attributed():
    rng = random.Random(0)
    rows, world = 37, 5
    cuts = sorted(rng.sample(range(1, rows), world - 1))
    bounds = list(zip([0, *cuts], [*cuts, rows]))
    plans = []
    for lo, hi in reversed(bounds):  # ranks hold shards out of order
        items = [_item("w", (lo, 0), (hi - lo, 3), (rows, 3)), _item("r", (0,), (6,), (6,))]
        plans.append(SavePlan(items))
    new_plans, metadata = _global(plans)
    chunks = metadata.state_dict_metadata["w"].chunks
    assert [tuple(c.offsets) for c in chunks] == [(lo, 0) for lo, _ in bounds]
    stock = pickle.loads(pickle.dumps(metadata.planner_data))  # as a stock writer records it
    info = SaveInfo.from_planner_data(stock)
    assert info.tensors["w"]["ranks"] == [world - 1 - i for i in range(world)]
    assert metadata.planner_data.layout.tensors["w"].writers == tuple(range(world))
    assert sum(int(p.planner_data.keep[1]) for p in new_plans) == 1  # "r" written once


def test_ranks_disagreeing_on_a_tensor_are_named():
    plans = [SavePlan([_item("w", (0, 0), (2, 4), (4, 4))]),
             SavePlan([_item("w", (2, 0), (2, 5), (4, 5))])]
    with pytest.raises(SavePlanError, match=r"w: ranks disagree.*rank 0 has global shape \(4, 4\)"):
        _global(plans)


def test_gap_in_the_sharding_is_refused():
    plans = [SavePlan([_item("w", (0, 0), (2, 4), (5, 4))]),
             SavePlan([_item("w", (2, 0), (2, 4), (5, 4))])]
    with pytest.raises(SavePlanError, match="w: fragments cover 16 of 20 elements"):
        _global(plans)


def test_holders_disagreeing_on_a_fragment_extent_are_named():
    plans = [SavePlan([_item("w", (0, 0), (2, 4), (4, 4)), _item("w", (2, 0), (2, 4), (4, 4))]),
             SavePlan([_item("w", (0, 0), (3, 4), (4, 4))])]
    with pytest.raises(SavePlanError, match=r"w: ranks 0 and 1 hold different fragments at offsets \[0, 0\]"):
        _global(plans)


def test_fragment_outside_the_tensor_is_named():
    plans = [SavePlan([_item("w", (3, 0), (2, 4), (4, 4))])]
    with pytest.raises(SavePlanError, match=r"w: rank 0 holds a fragment at offsets \[3, 0\].*outside"):
        _global(plans)


def test_stale_assignment_is_refused():
    planners, plans = _local_plans([{"a": torch.zeros(2), "b": torch.zeros(2)}])
    new_plans, _ = _global(plans)
    planners[0].set_up_planner({"a": torch.zeros(2)}, None, True)
    planners[0].create_local_plan()
    with pytest.raises(SavePlanError, match="assigns 2 items but this rank planned 1"):
        planners[0].finish_plan(new_plans[0])
