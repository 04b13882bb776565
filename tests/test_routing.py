"""Routing: the fragment indexes a loading rank reads are exactly those holding its boxes.

Property tests over random meshes, placements (Shard, Replicate, _StridedShard), uneven shapes
and boxes, driving the real code: every mesh coordinate's write items are planned by
``plan_globally`` (the coordinator's writer rule), every writer's index is encoded with the
writer's encoder, and a :class:`FragmentCatalog` routes query boxes from the header alone.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from torch_ucp.metadata.catalog import FragmentCatalog
from torch_ucp.metadata.checksums import crc32c
from torch_ucp.metadata.fragments import FragmentRows, checksum_counts, tensor_key
from torch_ucp.metadata.index import encode_index
from torch_ucp.metadata.placements import boxes_for, dim_owners, dim_runs, normalize_placements
from torch_ucp.metadata.schema import CheckpointMetadata, IndexRef, MeshInfo, PlacementInfo
from torch_ucp.planner.global_plan import plan_globally
from torch_ucp.planner.plan_table import LocalTableBuilder
from torch_ucp.planner.save_planner import save_layout

BLOCK = 64


def _items(name: str, shape, boxes, dtype) -> list[WriteItem]:
    props = TensorProperties(dtype=dtype)
    return [
        WriteItem(
            MetadataIndex(name, torch.Size(b.global_offsets)),
            WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                ChunkStorageMetadata(torch.Size(b.global_offsets), torch.Size(b.lengths)), props, torch.Size(shape)
            ),
        )
        for b in boxes
    ]


def _save(tensors, mesh: MeshInfo, rotate_min_bytes: int) -> FragmentCatalog:
    """Plan a save of ``tensors`` (name -> (shape, placements, dtype)) on every coordinate of
    ``mesh`` and build its indexes; the catalog of the result, fetching from memory."""
    tables = [None] * mesh.size
    for flat, coord in enumerate(itertools.product(*[range(n) for n in mesh.shape])):
        builder = LocalTableBuilder()
        items, layout_of = [], {}
        for name, (shape, placements, dtype) in tensors.items():
            layout_of[name] = builder.add_layout(mesh, placements, list(coord))
            builder.add_tensor(name, dtype, shape, layout_of[name], [name])
            items += _items(name, shape, boxes_for(shape, mesh.shape, placements, coord), dtype)
        tables[mesh.ranks[flat]] = builder.build(items, layout_of, {})  # the rank at coord
    planned = plan_globally(tables, rotate_min_bytes)
    layout = save_layout(planned, [])
    layout.rotate_min_bytes = rotate_min_bytes
    frags = planned.fragments
    key_of = np.array([tensor_key(k.name) for k in frags.keys], dtype=np.uint64)
    key_index = np.repeat(np.arange(len(frags.keys)), np.diff(frags.start))
    itemsize = np.array([torch.empty((), dtype=tensors[k.name][2]).element_size() for k in frags.keys])
    blobs, refs = {}, []
    for rank in np.unique(frags.writer).tolist():
        mine = np.flatnonzero(frags.writer == rank)
        nbytes = np.prod(frags.lengths[mine], axis=1) * itemsize[key_index[mine]]
        counts = checksum_counts(nbytes, BLOCK)
        rows = FragmentRows(
            tensor=np.zeros(len(mine), dtype=np.int64), offsets=frags.offsets[mine], lengths=frags.lengths[mine],
            objects=[f"data-x/{rank:05d}-0.bin"], object=np.zeros(len(mine), dtype=np.int32),
            byte_offset=np.zeros(len(mine), dtype=np.int64), byte_length=nbytes.astype(np.int64),
            checksum_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            checksums=np.zeros(int(counts.sum()), dtype=np.uint32), rank=np.full(len(mine), rank, dtype=np.int32),
        )
        blob = encode_index(rank, key_of[key_index[mine]], rows, BLOCK, None)
        name = f"data-x/{rank:05d}.idx"
        blobs[name] = blob
        refs.append(IndexRef(rank, name, len(blob), crc32c(blob), len(mine)))
    meta = CheckpointMetadata(
        save_id="x", world_size=mesh.size, tensors=layout.tensors, meshes=layout.meshes,
        checksum_block_bytes=BLOCK, rotate_min_bytes=rotate_min_bytes, indexes=refs,
    )
    fetched = []

    def fetch(want):
        fetched.extend(r.rank for r in want)
        return [blobs[r.object] for r in want]

    catalog = FragmentCatalog(meta, None, fetch, "memory://routing")
    catalog.fetched_ranks = fetched  # type: ignore[attr-defined]
    return catalog, planned


@st.composite
def layouts(draw):
    mesh_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 13), min_size=ndim, max_size=ndim)))
    placements = []
    for _ in mesh_shape:
        kind = draw(st.sampled_from(["replicate", "shard", "shard", "strided_shard"]))
        if kind == "replicate":
            placements.append(PlacementInfo("replicate"))
        elif kind == "shard":
            placements.append(PlacementInfo("shard", draw(st.integers(0, ndim - 1))))
        else:
            placements.append(PlacementInfo("strided_shard", draw(st.integers(0, ndim - 1)), draw(st.integers(2, 3))))
    offsets, lengths = [], []
    for n in shape:
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, n))
        offsets.append(a)
        lengths.append(b - a)
    ranks = list(range(math.prod(mesh_shape)))
    draw(st.randoms()).shuffle(ranks)  # a mesh whose rank table is not the identity
    return MeshInfo(mesh_shape, None, tuple(ranks)), shape, tuple(placements), tuple(offsets), tuple(lengths)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from([0, 4096, 1 << 40]))
def test_routed_indexes_are_exactly_those_holding_the_box(case, rotate_min_bytes):
    mesh, shape, placements, offsets, lengths = case
    tensors = {"t": (shape, placements, torch.float32), "u": (shape, placements, torch.bfloat16)}
    catalog, planned = _save(tensors, mesh, rotate_min_bytes)
    for k, key in enumerate(planned.fragments.keys):
        assert key.derived, key.name  # every DTensor layout follows the rule
        rows = planned.fragments.rows(k)
        lo, n = planned.fragments.offsets[rows], planned.fragments.lengths[rows]
        q_lo, q_hi = np.array(offsets), np.array(offsets) + np.array(lengths)
        hit = ((np.minimum(lo + n, q_hi) - np.maximum(lo, q_lo)) > 0).all(axis=1)
        holders = set(planned.fragments.writer[rows][hit].tolist())
        routed = catalog.writers_for(key.name, offsets, lengths)
        assert set(routed.tolist()) == holders, key.name
    catalog.fetched_ranks.clear()
    catalog.require([(name, offsets, lengths) for name in tensors])
    for name in tensors:
        frags = catalog.fragments_for(name, offsets, lengths)  # tiles the box (checked inside)
        assert sum(math.prod(f.lengths) for f in frags) >= math.prod(lengths)
    assert not catalog.complete or len(set(catalog.fetched_ranks)) == len(catalog.meta.indexes)
    want = set().union(*(set(catalog.writers_for(name, offsets, lengths).tolist()) for name in tensors))
    assert set(catalog.fetched_ranks) == want  # no index beyond the routed ones was read


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_dim_owners_agree_with_the_runs_of_every_coordinate(case):
    mesh, shape, placements, _, _ = case
    placements = normalize_placements(placements, len(shape))
    for d, size in enumerate(shape):
        owners = dim_owners(size, d, mesh.shape, placements)
        dims = [m for m, p in enumerate(placements) if p.kind != "replicate" and p.dim == d]
        seen = np.full(size, -1)
        for coord in itertools.product(*[range(n) for n in mesh.shape]):
            key = np.ravel_multi_index([coord[m] for m in dims], [mesh.shape[m] for m in dims]) if dims else 0
            for run in dim_runs(size, d, mesh.shape, placements, coord):
                span = slice(run.global_start, run.global_start + run.length)
                assert (seen[span] == -1).all() or (seen[span] == key).all()
                seen[span] = key
        assert (seen == owners).all()


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_boxes_of_all_coordinates_tile_the_tensor(case):
    mesh, shape, placements, _, _ = case
    cover = np.zeros(shape, dtype=np.int64)
    for coord in itertools.product(*[range(n) for n in mesh.shape]):
        local = 0
        for b in boxes_for(shape, mesh.shape, placements, coord):
            cover[tuple(slice(o, o + n) for o, n in zip(b.global_offsets, b.lengths))] += 1
            local += b.numel
    replicas = math.prod(n for n, p in zip(mesh.shape, placements) if p.kind == "replicate")
    assert (cover == replicas).all()
