"""The pure placement arithmetic (torch_ucp.metadata.placements) against DTensor itself.

``boxes_for`` says which boxes of the logical tensor a mesh coordinate holds. Two properties,
over random shapes, meshes (1-D to 3-D, up to 8 ranks) and placements (``Shard`` on any dim,
negative dims, ``Replicate``, ``_StridedShard`` of any split factor, uneven and empty shards):

- it matches DTensor: the local tensor ``distribute_tensor`` gives each rank equals the global
  tensor's elements gathered through that rank's boxes, in the places the boxes name;
- the distinct shards tile the tensor: every element is held by exactly the coordinates that
  differ only along replicated mesh dims, and each holder holds it once.

The DTensors are real: a ``fake`` process group of 8 ranks in this process, and for each
coordinate a ``DeviceMesh`` that puts this process's rank there (``src_data_rank=None``:
every rank cuts its shard from the tensor it has, so no collective runs).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard
from torch.testing._internal.distributed.fake_pg import FakeStore

from torch_ucp.metadata.placements import (
    Run,
    boxes_for,
    dim_owners,
    dim_runs,
    normalize_placements,
    placement_info,
    sharding_mesh_dims,
)
from torch_ucp.metadata.schema import PlacementInfo

# Generation may be slow on a loaded CI machine; the examples are few and fixed in number.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORLD = 8
MESH_SHAPES = [(1,), (2,), (3,), (8,), (2, 2), (2, 3), (4, 2), (1, 5), (2, 2, 2), (2, 1, 3)]


@pytest.fixture(scope="module")
def fake_world():
    """A fake default process group of WORLD ranks, this process being rank 0."""
    assert not dist.is_initialized(), "a test left a default process group behind"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def mesh_at(mesh_shape: tuple[int, ...], coordinate: tuple[int, ...]) -> DeviceMesh:
    """A CPU mesh of ``mesh_shape`` on which this process (rank 0) sits at ``coordinate``."""
    n = math.prod(mesh_shape)
    here = int(np.ravel_multi_index(coordinate, mesh_shape))
    ranks = list(range(n))
    ranks[0], ranks[here] = ranks[here], ranks[0]
    mesh = DeviceMesh("cpu", torch.tensor(ranks).reshape(mesh_shape))
    assert tuple(mesh.get_coordinate()) == tuple(coordinate)
    return mesh


def coordinates(mesh_shape):
    return list(itertools.product(*(range(n) for n in mesh_shape)))


@st.composite
def layouts(draw, max_ndim: int = 3, max_size: int = 11):
    """(shape, mesh_shape, torch placements)."""
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(0, max_size), min_size=ndim, max_size=ndim)))
    mesh_shape = draw(st.sampled_from(MESH_SHAPES))
    dims = st.integers(-ndim, ndim - 1)
    placement = st.one_of(
        st.just(Replicate()),
        dims.map(Shard),
        st.tuples(dims, st.integers(1, 4)).map(lambda a: _StridedShard(a[0], split_factor=a[1])),
    )
    placements = tuple(
        draw(st.lists(placement, min_size=len(mesh_shape), max_size=len(mesh_shape)))
    )
    return shape, mesh_shape, placements


def infos(placements):
    return [placement_info(p) for p in placements]


def assemble(global_tensor: torch.Tensor, boxes, local_shape) -> torch.Tensor:
    """The local tensor the boxes describe, cut from ``global_tensor`` (-1 where none lands)."""
    out = torch.full(tuple(local_shape), -1, dtype=global_tensor.dtype)
    for b in boxes:
        src = tuple(slice(o, o + n) for o, n in zip(b.global_offsets, b.lengths))
        dst = tuple(slice(o, o + n) for o, n in zip(b.local_offsets, b.lengths))
        out[dst] = global_tensor[src]
    return out


@settings(PROPERTY, max_examples=100)
@given(layouts())
def test_boxes_are_what_distribute_tensor_gives_each_rank(fake_world, layout):
    shape, mesh_shape, placements = layout
    full = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    for coord in coordinates(mesh_shape):
        local = distribute_tensor(
            full, mesh_at(mesh_shape, coord), placements, src_data_rank=None
        ).to_local()
        boxes = boxes_for(shape, mesh_shape, infos(placements), coord)
        assert sum(b.numel for b in boxes) == local.numel(), (coord, boxes, local.shape)
        for b in boxes:
            assert all(0 <= o and o + n <= s for o, n, s in zip(b.global_offsets, b.lengths, shape))
            assert all(
                0 <= o and o + n <= s for o, n, s in zip(b.local_offsets, b.lengths, local.shape)
            )
        assert torch.equal(assemble(full, boxes, local.shape), local), (coord, boxes)


@settings(PROPERTY, max_examples=40)
@given(layouts())
def test_one_box_per_plain_shard_is_torchs_local_shape_and_offset(fake_world, layout):
    """With only ``Shard``/``Replicate``, every rank holds one box: torch's checkpoint box.

    Dims are made non-negative first: torch 2.13's ``compute_local_shape_and_global_offset``
    misplaces ``(Shard(1), Shard(-2))`` of a 3-D tensor (offset 0 for the second row), though
    ``distribute_tensor`` cuts it right and the test above checks boxes_for against that."""
    shape, mesh_shape, placements = layout
    placements = tuple(
        p if isinstance(p, Replicate) else Shard(p.dim % len(shape)) for p in placements
    )
    for coord in coordinates(mesh_shape):
        local_shape, offset = compute_local_shape_and_global_offset(
            shape, mesh_at(mesh_shape, coord), placements
        )
        boxes = boxes_for(shape, mesh_shape, infos(placements), coord)
        if math.prod(local_shape) == 0:
            assert boxes == []
            continue
        assert len(boxes) == 1, boxes
        assert boxes[0].lengths == tuple(local_shape)
        assert boxes[0].global_offsets == tuple(offset)
        assert boxes[0].local_offsets == (0,) * len(shape)


@settings(PROPERTY, max_examples=200)
@given(layouts(max_ndim=3, max_size=13))
def test_distinct_shards_tile_the_tensor_exactly(layout):
    shape, mesh_shape, placements = layout
    info = infos(placements)
    normalized = normalize_placements(info, len(shape))
    sharding = {m for d in range(len(shape)) for m in sharding_mesh_dims(normalized, d)}
    replicas = math.prod(n for m, n in enumerate(mesh_shape) if m not in sharding)
    held = np.zeros(shape, dtype=np.int64)
    shards: dict[tuple, tuple] = {}  # the coordinate along sharding mesh dims -> its boxes
    for coord in coordinates(mesh_shape):
        boxes = boxes_for(shape, mesh_shape, info, coord)
        key = tuple(c for m, c in enumerate(coord) if m in sharding)
        # Coordinates that differ only along replicated mesh dims hold the same shard.
        assert shards.setdefault(key, tuple(boxes)) == tuple(boxes), (coord, boxes)
        for b in boxes:
            held[tuple(slice(o, o + n) for o, n in zip(b.global_offsets, b.lengths))] += 1
        assert len({b.local_offsets for b in boxes}) == len(boxes)  # no two land on one place
    assert np.all(held == replicas), held


def test_boxes_land_on_distinct_local_elements():
    """The local offsets of a coordinate's boxes partition its local tensor (strided case)."""
    shape, mesh_shape = (10, 7), (2, 2)
    info = [PlacementInfo("strided_shard", 0, 2), PlacementInfo("shard", 0)]
    for coord in coordinates(mesh_shape):
        boxes = boxes_for(shape, mesh_shape, info, coord)
        rows = sum(r.length for r in dim_runs(10, 0, mesh_shape, tuple(info), coord))
        local = np.zeros((rows, 7), dtype=np.int64)
        for b in boxes:
            local[tuple(slice(o, o + n) for o, n in zip(b.local_offsets, b.lengths))] += 1
        assert np.all(local == 1), (coord, boxes)


@settings(PROPERTY, max_examples=200)
@given(layouts(max_ndim=2, max_size=17), st.data())
def test_dim_runs_are_maximal_and_dim_owners_agree(layout, data):
    shape, mesh_shape, placements = layout
    normalized = normalize_placements(infos(placements), len(shape))
    dim = data.draw(st.integers(0, len(shape) - 1))
    size = shape[dim]
    owners = dim_owners(size, dim, tuple(mesh_shape), normalized)
    sharding = sharding_mesh_dims(normalized, dim)
    seen = np.zeros(size, dtype=np.int64)
    for coord in coordinates(mesh_shape):
        runs = dim_runs(size, dim, tuple(mesh_shape), normalized, coord)
        local = 0
        for a, b in zip(runs, runs[1:]):
            # Runs follow each other in the local tensor and are maximal: no two could merge.
            assert b.local_start == a.local_start + a.length
            assert b.global_start != a.global_start + a.length
        for r in runs:
            assert r.length > 0 and r.local_start == local
            local += r.length
            idx = np.arange(r.global_start, r.global_start + r.length)
            # dim_owners (a vectorized path for plain Shard) names this coordinate as the owner.
            expected = (
                int(
                    np.ravel_multi_index(
                        [coord[m] for m in sharding], [mesh_shape[m] for m in sharding]
                    )
                )
                if sharding
                else 0
            )
            assert np.all(owners[idx] == expected), (coord, r, owners)
            if all(coord[m] == 0 for m in range(len(mesh_shape)) if m not in sharding):
                seen[idx] += 1
    assert np.all(seen == 1)


def test_strided_shard_example_of_the_module_docstring():
    """FSDP2 + TP: rows 0..9 on (dp=2, tp=2) with (_StridedShard(0, sf=2), Shard(0))."""
    info = (PlacementInfo("strided_shard", 0, 2), PlacementInfo("shard", 0))
    assert dim_runs(10, 0, (2, 2), info, (1, 0)) == (Run(3, 2, 0),)
    held = {
        c: [(r.global_start, r.length) for r in dim_runs(10, 0, (2, 2), info, c)]
        for c in coordinates((2, 2))
    }
    assert held == {(0, 0): [(0, 3)], (0, 1): [(5, 3)], (1, 0): [(3, 2)], (1, 1): [(8, 2)]}


def test_non_contiguous_shards_become_several_exact_boxes(fake_world):
    """A _StridedShard with no Shard after it holds rows from each of its split pieces."""
    shape, mesh_shape, placements = (8, 3), (2,), (_StridedShard(0, split_factor=2),)
    full = torch.arange(24).reshape(shape)
    boxes = boxes_for(shape, mesh_shape, infos(placements), (0,))
    local = distribute_tensor(
        full, mesh_at(mesh_shape, (0,)), placements, src_data_rank=None
    ).to_local()
    assert len(boxes) > 1
    assert torch.equal(assemble(full, boxes, local.shape), local)


def test_scalars_empty_tensors_and_refusals():
    assert [
        (b.global_offsets, b.lengths)
        for b in boxes_for((), (4,), [PlacementInfo("replicate")], (2,))
    ] == [((), ())]
    assert boxes_for((0, 5), (2,), [PlacementInfo("shard", 1)], (1,)) == []
    # A shard of an uneven split past the end holds nothing.
    assert boxes_for((3,), (4,), [PlacementInfo("shard", 0)], (3,)) == []
    with pytest.raises(ValueError, match="Partial"):
        boxes_for((4,), (2,), infos([Partial()]), (0,))
    with pytest.raises(ValueError, match="does not fit a tensor of 2 dims"):
        boxes_for((4, 4), (2,), [PlacementInfo("shard", 2)], (0,))
    with pytest.raises(ValueError, match="not supported"):
        boxes_for((4,), (2,), [PlacementInfo("interleaved", 0)], (0,))
