"""Reshard matrix on local disk: every save layout loads bit-exactly into every load layout.

World sizes 1 (no process group), 2 and 4; Shard(0), Shard(1), Replicate, 2-D meshes, the
FSDP2 + TP ``_StridedShard`` layout, HSDP; dims not divisible by the rank count; model tensors
of several dtypes plus nested values and a Stateful object. Real gloo processes.
"""

from __future__ import annotations

import pytest

from tests.support.matrix import LAYOUTS, load_layouts, save_layouts, world_size
from torch_ucp.demo.launch import run_distributed

SAVE = ["ws1-plain", "ws2-shard1", "ws2-replicate", "ws4-shard0", "ws4-2d", "ws4-fsdp-tp-strided", "ws4-hsdp"]
LOAD = ["ws1-plain", "ws2-shard0", "ws2-shard1", "ws4-2d-swapped", "ws4-fsdp-tp-strided", "ws4-shard1"]


def run_matrix(base: str, storage_options: dict, save: list[str] = SAVE, load: list[str] = LOAD) -> dict:
    """Save every ``save`` layout under ``base``, load each into every ``load`` layout; returns
    ``{"source->target": [problems]}``."""
    for ws in (1, 2, 4):
        layouts = [s for s in save if world_size(s) == ws]
        if ws == 1:
            save_layouts(base, layouts, storage_options)
        else:
            run_distributed(save_layouts, ws, base, layouts, storage_options)
    results: dict = {}
    for ws in (1, 2, 4):
        targets = [t for t in load if world_size(t) == ws]
        if ws == 1:
            per_rank = [load_layouts(base, save, targets, storage_options)]
        else:
            per_rank = run_distributed(load_layouts, ws, base, save, targets, storage_options)
        for case in per_rank[0]:
            results[case] = sorted({p for r in per_rank for p in r[case]["problems"]})
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return run_matrix(str(tmp_path_factory.mktemp("matrix")), {})


@pytest.mark.parametrize("target", LOAD)
@pytest.mark.parametrize("source", SAVE)
def test_reshard(matrix, source, target):
    assert f"{source}->{target}" in matrix
    assert matrix[f"{source}->{target}"] == []


def test_layouts_cover_the_issue():
    kinds = {type(p).__name__ for _, _, ps in LAYOUTS.values() for p in ps}
    assert {"Shard", "Replicate", "_StridedShard"} <= kinds
