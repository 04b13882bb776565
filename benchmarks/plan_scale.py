"""The metadata life cycle at scale, without processes: a Llama-70B-shaped state on 1,024 to
16,384 simulated ranks, driving the real planner, writer and reader code.

    python benchmarks/plan_scale.py [--ranks 1024 2048 4096 8192] [--tp 8] [--json FILE]
                                    [--stock-max-ranks 256] [--dir DIR] [--share [hsdp dp fsdp]]
    python benchmarks/plan_scale.py --ranks 1024 8192 --share-only      # the share rows alone

State: FSDP x TP (TP colwise/rowwise, FSDP on dim 0, norms TP-replicated; AdamW ``exp_avg`` and
``exp_avg_sq`` per parameter and a replicated ``step``), bf16. For every rank count:

1. **Local plans.** Every rank's plan summary is built as ``UCPSavePlanner.create_local_plan``
   ships it (rank 0's catalog from real ``WriteItem``s, the per-rank columns from ``boxes_for``,
   the function the planner uses), then pickled as DCP's gather sends it.
2. **Coordinator** (a fresh process, so its peak memory is its own): receives the pickled plans,
   runs ``UCPSavePlanner.create_global_plan`` + ``UCPWriter.prepare_global_plan``
   (``global_plan_s``), then, after the ranks wrote, unpickles every rank's write result as
   DCP's gather delivers it and runs ``UCPWriter.finish``: header built, encoded, written
   atomically, stale data removed, metadata made compact (``commit_s``). ``broadcast_bytes`` is
   the pickle of the ``Metadata`` DCP then broadcasts to every rank.
3. **Writers**: each rank's fragment index is built from its assigned rows with the writer's own
   encoder (:func:`torch_ucp.metadata.index.encode_index`) and written (no fsync in bulk;
   ``index_write_ms`` times one rank's whole path, fsync included).
4. **One loading rank of another layout** (FSDP x TP=4, a fresh process): ``UCPReader`` reads the
   header (``load_metadata_s``), ``UCPLoadPlanner.create_local_plan`` in a fake process group of
   the full world size routes its boxes, fetches its indexes and plans its reads
   (``load_plan_s``); ``load_peak_mib`` is its memory above the process's baseline (torch
   imported, target state allocated); ``load_metadata_bytes_read`` header + indexes read;
   ``load_gather_bytes`` the pickled load plans of all ranks (what DCP gathers).
   ``all_ranks_metadata_bytes_read`` adds up, over every loading rank, the header and the
   indexes its boxes route to (routing computed exactly for a sample of ranks spread over the
   mesh, scaled to all ranks: loading ranks of one layout are alike).
5. **Stock DCP** beside it up to ``--stock-max-ranks``: ``DefaultSavePlanner`` global plan, the
   pickled ``Metadata`` (written as ``.metadata``, broadcast at the end of the save, and read and
   unpickled whole by every loading rank), and ``DefaultLoadPlanner`` on it.
6. **Read once, share** (``--share``, ``--share-only``; a separate table): every loading rank's
   share request (``UCPReader.prepare_local_plan``'s, digests from ``summarize`` itself) for an
   HSDP load (2 replicas of FSDP x TP=4) or a DP load (every tensor whole on every rank),
   pickled as DCP gathers it; a fresh coordinator process runs ``UCPReader.prepare_global_plan``
   with ``share_reads=True`` (seconds, peak memory above the gathered plans), the pickled
   assignment of each rank (largest, and all together: DCP's scatter), and two ranks compute
   their schedules (``set_messages`` over their sets, as ``read_data`` does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor.placement_types import Replicate, Shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from support_measure import reset_peak_rss, status_bytes  # noqa: E402

from torch_ucp import knobs  # noqa: E402
from torch_ucp.metadata.checksums import BlockGrid, crc32c  # noqa: E402
from torch_ucp.metadata.fragments import FragmentRows, tensor_key  # noqa: E402
from torch_ucp.metadata.index import encode_index  # noqa: E402
from torch_ucp.metadata.placements import boxes_for  # noqa: E402
from torch_ucp.metadata.schema import (  # noqa: E402
    ITEM_ALIGNMENT,
    IndexRef,
    MeshInfo,
    PlacementInfo,
    data_object_name,
    index_object_name,
)
from torch_ucp.planner.plan_table import LocalPlanTable, LocalTableBuilder, RankLocalItems  # noqa: E402

DIM, FFN, VOCAB, LAYERS, KV = 8192, 28672, 128256, 80, 1024
TP_PLACEMENT = {"col": Shard(0), "row": Shard(1), "rep": Replicate()}
BLOCK, WIDTH = knobs.checksum_block_bytes(), knobs.checksum_block_width()  # the writer's defaults


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


def _info(p) -> PlacementInfo:
    return PlacementInfo("replicate") if isinstance(p, Replicate) else PlacementInfo("shard", p.dim)


class SyntheticPlans:
    """Every rank's local plan for a (dp, tp) mesh, from per-(shape, style) box tables."""

    def __init__(self, ranks: int, tp: int, params) -> None:
        self.ranks, self.tp, self.dp = ranks, tp, ranks // tp
        self.keys = state_keys(params)
        shapes = sorted({(shape, style) for _, shape, style in self.keys if style != "step"})
        self._boxes = {s: self._box_table(*s) for s in shapes}
        self.mesh = MeshInfo((self.dp, self.tp), ("dp", "tp"), tuple(range(ranks)))

    def _box_table(self, shape, style) -> tuple[np.ndarray, np.ndarray]:
        """offsets, lengths [ranks, ndim] of the one box each rank holds."""
        placements = (PlacementInfo("shard", 0), _info(TP_PLACEMENT[style]))
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
        layout_of = {}
        for key, _, style in self.keys:
            if style != "step":
                placements = (PlacementInfo("shard", 0), _info(TP_PLACEMENT[style]))
                layout_of[key] = builder.add_layout(self.mesh, placements, [0, 0])
        template = builder.build(self.items(0), layout_of, {k: k.split(".") for k, _, _ in self.keys})
        template_key = template.arrays()[0]
        kinds = [None, *self._boxes]  # row 0: the scalar step (offset 0, length 1)
        box_off = np.zeros((len(kinds), self.ranks, template.ndim), dtype=np.int64)
        box_len = np.ones_like(box_off)
        for i, kind in enumerate(kinds[1:], 1):
            off, length = self._boxes[kind]
            box_off[i, :, : off.shape[1]], box_len[i, :, : off.shape[1]] = off, length
        kind_of = np.array([0 if style == "step" else kinds.index((shape, style))
                            for _, shape, style in self.keys])[template_key]
        itemsize = np.where(kind_of == 0, 4, 2)
        tables = []
        for r in range(self.ranks):
            lengths = box_len[kind_of, r]
            held = (kind_of == 0) | (lengths.prod(axis=1) > 0)
            coords = [[r // self.tp, r % self.tp] for _ in template.coordinates]
            tables.append(LocalPlanTable.pack(template.catalog, template.digest, coords, template_key[held],
                                              box_off[kind_of, r][held], lengths[held],
                                              (lengths.prod(axis=1) * itemsize)[held]))
        return tables


def _peak_mib() -> float:
    return status_bytes("VmHWM") / 2**20


def _rss_mib() -> float:
    return status_bytes("VmRSS") / 2**20


# ------------------------------------------------------------------------------- the stages
def coordinator(work: str) -> None:
    """Child process: the coordinator of one save. Plans globally on every rank's pickled plan;
    a forked process plays the ranks writing their indexes; then the coordinator commits on
    every rank's pickled write result."""
    from torch_ucp import UCPSavePlanner, UCPWriter

    with open(os.path.join(work, "plans.pkl"), "rb") as f:
        wire = pickle.load(f)  # what DCP's gather delivers: one pickled plan per rank
    gc.collect()
    t0 = time.perf_counter()
    plans = [pickle.loads(w) for w in wire]
    del wire
    planner = UCPSavePlanner()
    planner.set_up_planner({}, None, True)
    new_plans, metadata = planner.create_global_plan(plans)
    writer = UCPWriter(os.path.join(work, "ckpt"))
    writer.set_up_storage_writer(True)
    new_plans = writer.prepare_global_plan(new_plans)
    global_plan_s = time.perf_counter() - t0
    plan_peak = _peak_mib()
    scatter = sum(len(pickle.dumps(p)) for p in new_plans)
    record = {"global_plan_s": global_plan_s, "scatter_bytes": scatter,
              "fragments": int(sum(t.fragments for t in metadata.planner_data.layout.tensors.values()))}
    pid = os.fork()
    if pid == 0:  # the ranks: write every index, report as DCP's gather delivers it
        try:
            tables = [p.planner_data for p in plans]
            keep = [p.planner_data.keep for p in new_plans]
            out = write_indexes(work, writer.save_id, tables, keep)
            with open(os.path.join(work, "writers.json"), "w") as f:
                json.dump(out, f)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    del plans, new_plans
    with open(os.path.join(work, "writers.json")) as f:
        record.update(json.load(f))
    with open(os.path.join(work, "results.pkl"), "rb") as f:
        gathered = f.read()
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    results = pickle.loads(gathered)
    writer.finish(metadata, results)
    commit_s = time.perf_counter() - t0
    broadcast = pickle.dumps(metadata)
    record.update({
        "commit_s": commit_s,
        "coordinator_peak_mib": max(plan_peak, _peak_mib()),
        "gathered_results_bytes": len(gathered),
        "broadcast_bytes": len(broadcast),
        "header_bytes": os.path.getsize(os.path.join(work, "ckpt", ".metadata")),
    })
    _emit(record)


def write_indexes(work: str, save_id: str, tables: list[LocalPlanTable], keep: list[np.ndarray]) -> dict:
    """Every rank's fragment index from its assigned rows (synthetic byte offsets, real
    encoder), and the write result each rank reports, pickled as DCP's gather delivers them."""
    from torch_ucp.storage.store import open_store
    from torch_ucp.storage.writer import RANK_RESULT, RankWritten

    catalog = tables[0].parse_catalog()
    names = [k[0] for k in catalog["keys"]]
    keys = np.array([tensor_key(n) for n in names], dtype=np.uint64)
    ndims = np.array([len(k[3] or ()) for k in catalog["keys"]], dtype=np.int64)
    itemsize = np.array([2 if k[2] == "bfloat16" else 4 for k in catalog["keys"]], dtype=np.int64)
    folder = os.path.join(work, "ckpt", f"data-{save_id}")
    os.makedirs(folder, exist_ok=True)
    results = []
    total = 0
    store = open_store(os.path.join(work, "ckpt"))
    one_rank_s = 0.0
    for r, (table, flags) in enumerate(zip(tables, keep)):
        t0 = time.perf_counter()
        t_key, t_off, t_len, t_bytes = table.arrays()
        k = t_key[flags]
        rows = _rank_rows(t_off[flags], t_len[flags], t_bytes[flags], ndims[k], itemsize[k], save_id, r)
        blob = encode_index(r, keys[k], rows, BLOCK, WIDTH)
        name = index_object_name(save_id, r)
        if r == 0:  # one rank's real path, fsync included
            store.write_object(name, blob)
            one_rank_s = time.perf_counter() - t0
        else:
            with open(os.path.join(work, "ckpt", name), "wb") as f:
                f.write(blob)
        report = RankWritten(r, IndexRef(r, name, len(blob), crc32c(blob), len(rows)), [], 0)
        results.append([WriteResult(MetadataIndex(RANK_RESULT), 0, report)])
        total += len(blob)
    with open(os.path.join(work, "results.pkl"), "wb") as f:
        f.write(pickle.dumps(results))
    return {"index_bytes": total, "index_write_ms": one_rank_s * 1e3}


def _rank_rows(offsets, lengths, nbytes, ndims, itemsize, save_id: str, rank: int) -> FragmentRows:
    """The rows rank ``rank`` writes: its kept items, laid out in one data object."""
    n = len(nbytes)
    aligned = -(-nbytes // ITEM_ALIGNMENT) * ITEM_ALIGNMENT
    counts = BlockGrid.counts(lengths, ndims, itemsize, BLOCK, WIDTH)
    return FragmentRows(
        tensor=np.zeros(n, dtype=np.int64),
        offsets=offsets.astype(np.int64),
        lengths=lengths.astype(np.int64),
        objects=[data_object_name(save_id, rank, 0)],
        object=np.zeros(n, dtype=np.int32),
        byte_offset=np.concatenate([[0], np.cumsum(aligned)[:-1]]).astype(np.int64),
        byte_length=nbytes.astype(np.int64),
        checksum_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        checksums=np.zeros(int(counts.sum()), dtype=np.uint32),
        rank=np.full(n, rank, dtype=np.int32),
    )


def _target_state(ranks: int, tp: int, rank: int, params):
    """One loading rank's DTensor state for the (ranks // tp, tp) layout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (ranks // tp, tp), mesh_dim_names=("dp", "tp"))
    state = {}
    for key, shape, style in state_keys(params):
        if style == "step":
            state[key] = torch.zeros(())
            continue
        placements = (Shard(0), TP_PLACEMENT[style])
        info = (PlacementInfo("shard", 0), _info(TP_PLACEMENT[style]))
        boxes = boxes_for(shape, tuple(mesh.shape), info, tuple(mesh.get_coordinate()))
        local = torch.empty(boxes[0].lengths if boxes else (0, *shape[1:]), dtype=torch.bfloat16)
        state[key] = DTensor.from_local(local, mesh, placements, run_check=False,
                                        shape=torch.Size(shape), stride=_contiguous_stride(shape))
    return state


def load_one_rank(work: str, ranks: int, tp: int, rank: int, stock: bool) -> None:
    """Child process: one loading rank of the (FSDP, TP=tp) layout, in a fake process group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torch_ucp import UCPLoadPlanner, UCPReader

    params = llama70b_params()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
    try:
        state = _target_state(ranks, tp, rank, params)
        gc.collect()
        base = _rss_mib()
        reset_peak_rss()
        path = os.path.join(work, "stock" if stock else "ckpt")
        t0 = time.perf_counter()
        if stock:
            from torch.distributed.checkpoint import FileSystemReader

            reader = FileSystemReader(path)
            metadata = reader.read_metadata()
            read = os.path.getsize(os.path.join(path, ".metadata"))
            planner = DefaultLoadPlanner()
        else:
            reader = UCPReader(path)
            metadata = reader.read_metadata()
            planner = UCPLoadPlanner()
        load_metadata_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        planner.set_up_planner(state, metadata, False)
        plan = planner.create_local_plan()
        load_plan_s = time.perf_counter() - t0
        assert plan.items, "the load plan reads nothing"
        if not stock:
            catalog = reader.catalog()
            read = os.path.getsize(os.path.join(path, ".metadata")) + catalog.bytes_fetched
            indexes = catalog.indexes_fetched
        else:
            indexes = 0
        _emit({"load_metadata_s": load_metadata_s, "load_plan_s": load_plan_s,
               "load_peak_mib": _peak_mib() - base, "load_metadata_bytes_read": read,
               "load_indexes_read": indexes, "load_gather_bytes": len(pickle.dumps(plan)) * ranks,
               "read_items": len(plan.items)})
    finally:
        dist.destroy_process_group()


def all_ranks_bytes(work: str, ranks: int, tp: int, samples: int) -> dict:
    """Header + routed indexes summed over every loading rank (exact routing for ``samples``
    ranks spread over the mesh, scaled to all ranks)."""
    from torch_ucp.storage.reader import open_catalog
    from torch_ucp.storage.store import open_store

    params = llama70b_params()
    catalog = open_catalog(open_store(os.path.join(work, "ckpt")))
    header = os.path.getsize(os.path.join(work, "ckpt", ".metadata"))
    sizes = {ref.rank: ref.nbytes for ref in catalog.meta.indexes}
    dp = ranks // tp
    picked = np.unique(np.linspace(0, ranks - 1, num=min(samples, ranks)).astype(np.int64))
    total = 0
    for rank in picked.tolist():
        coord = (rank // tp, rank % tp)
        needed: set[int] = set()
        for key, shape, style in state_keys(params):
            if style == "step":
                boxes = [((), ())]
            else:
                info = (PlacementInfo("shard", 0), _info(TP_PLACEMENT[style]))
                boxes = [(b.global_offsets, b.lengths) for b in boxes_for(shape, (dp, tp), info, coord)]
            for off, lens in boxes:
                writers = catalog.writers_for(key, off, lens)
                needed.update(sizes if writers is None else writers.tolist())
        total += header + sum(sizes.get(r, 0) for r in needed)
    return {"all_ranks_metadata_bytes_read": int(total / len(picked) * ranks), "sampled_ranks": len(picked)}


def stock_dcp(work: str, synthetic: SyntheticPlans) -> dict:
    """Stock DCP on the same state: global plan, pickled Metadata, one rank's load."""
    plans = [SavePlan(synthetic.items(r), planner_data={}) for r in range(synthetic.ranks)]
    gathered = sum(len(pickle.dumps(p)) for p in plans)
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, None, True)
    t0 = time.perf_counter()
    _, metadata = planner.create_global_plan(plans)
    global_s = time.perf_counter() - t0
    del plans
    blob = pickle.dumps(metadata)
    os.makedirs(os.path.join(work, "stock"), exist_ok=True)
    with open(os.path.join(work, "stock", ".metadata"), "wb") as f:
        f.write(blob)
    return {"stock_global_plan_s": global_s, "stock_gathered_bytes": gathered,
            "stock_metadata_bytes": len(blob), "stock_broadcast_bytes": len(blob),
            "stock_all_ranks_metadata_bytes_read": len(blob) * synthetic.ranks}


# --------------------------------------------------------------------- read once, share (issue 15)
SHARE_LAYOUTS = {
    "hsdp": "HSDP: 2 replicas of FSDP x TP=4 (a rank shares its shards with its replica, TP-replicated "
            "norm shards with 8 ranks, steps with all)",
    "dp": "DP: every rank loads every tensor whole (one set of all ranks)",
    "fsdp": "FSDP x TP=4, no replicas: only TP-replicated norm shards (with 4 ranks) and the steps are "
            "requested; what the default adds to a load from an object store with little to share",
}
REPLICAS = {"hsdp": 2, "fsdp": 1}


def share_requests(ranks: int, layout: str, params) -> list[bytes]:
    """Every loading rank's ``LoadPlan.storage_data`` with ``share_reads`` on, pickled as DCP's
    gather sends it. Digests come from :func:`~torch_ucp.storage.sharing.summarize` itself, once
    per distinct (box kind, replica-local rank): ranks of one kind hold boxes alike."""
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    from torch_ucp.storage.reader import _LocalRequest
    from torch_ucp.storage.sharing import ShareRequest, summarize

    def digest(offsets, lengths) -> int:
        index = MetadataIndex("t", tuple(offsets))
        item = ReadItem(LoadItemType.TENSOR, index, (0,) * len(offsets), index, (0,) * len(offsets), tuple(lengths))
        return int(summarize(0, ranks, [item], {"t": 0}).digests[0])

    keys = state_keys(params)
    whole = {shape: digest((0,) * len(shape), shape) for _, shape, _ in keys}
    if layout == "dp":
        table = np.array([whole[shape] for _, shape, _ in keys], dtype=np.uint64)[:, None]
        local = np.zeros(ranks, dtype=np.int64)
        held = np.ones((len(keys), 1), dtype=bool)
    else:
        per_replica = ranks // REPLICAS[layout]
        replica = SyntheticPlans(per_replica, 4, params)
        kinds = {}
        for _, shape, style in keys:
            if style != "step" and (shape, style) not in kinds:
                off, length = replica._boxes[(shape, style)]
                kinds[(shape, style)] = [digest(o, n) for o, n in zip(off.tolist(), length.tolist())]
        table = np.array([[whole[shape]] * per_replica if style == "step" else kinds[(shape, style)]
                          for _, shape, style in keys], dtype=np.uint64)
        local = np.arange(ranks) % per_replica
        held = np.zeros((len(keys), per_replica), dtype=bool)
        held[:, :] = [[True] * per_replica if style == "step" else
                      (replica._boxes[(shape, style)][1].prod(axis=1) > 0).tolist() for _, shape, style in keys]
        if REPLICAS[layout] == 1:  # as summarize leaves out FSDP x TP shards, replicated on no mesh dim
            held &= np.array([style in ("rep", "step") for _, _, style in keys])[:, None]
    sent = summarize(0, ranks, [], {})  # the dtypes a rank's request has on the wire
    positions = np.arange(len(keys), dtype=sent.tensors.dtype)
    table = table.astype(sent.digests.dtype)
    out = []
    for r in range(ranks):  # a rank with an empty shard of a tensor has no read item of it
        mine = held[:, local[r]]
        request = ShareRequest(r, ranks, positions[mine], table[mine, local[r]])
        out.append(pickle.dumps(LoadPlan([], storage_data=_LocalRequest(None, request))))
    return out


def share_boxes(ranks: int, layout: str, rank: int, params):
    """``rank``'s read boxes per tensor position and each tensor's item size, for the schedule."""
    keys = state_keys(params)
    itemsize = {key: 4 if style == "step" else 2 for key, _, style in keys}
    if layout == "dp":
        return [(key, (0,) * len(shape), tuple(shape)) for key, shape, _ in keys], itemsize
    per_replica = ranks // REPLICAS[layout]
    replica, q = SyntheticPlans(per_replica, 4, params), rank % per_replica
    boxes = []
    for key, shape, style in keys:
        if style == "step":
            boxes.append((key, (), ()))
        else:
            off, length = replica._boxes[(shape, style)]
            boxes.append((key, tuple(off[q].tolist()), tuple(length[q].tolist())))
    return boxes, itemsize


def share_coordinator(work: str, ranks: int, layout: str) -> None:
    """Child process: ``UCPReader.prepare_global_plan`` with ``share_reads`` on, on every rank's
    pickled plan (``share_plan_s``; ``share_peak_mib`` its memory above the unpickled plans);
    then two ranks' schedules (``set_messages`` for every set they are in)."""
    from torch_ucp import UCPReader
    from torch_ucp.storage.sharing import set_messages

    with open(os.path.join(work, "share.pkl"), "rb") as f:
        wire = pickle.load(f)
    plans = [pickle.loads(w) for w in wire]
    gathered = sum(len(w) for w in wire)
    del wire
    gc.collect()
    reset_peak_rss()
    base = _rss_mib()
    t0 = time.perf_counter()
    out = UCPReader(share_reads=True).prepare_global_plan(plans)
    plan_s = time.perf_counter() - t0
    peak = _peak_mib() - base
    sizes = [len(pickle.dumps(p.storage_data)) for p in out]
    record = {"share_gather_bytes": gathered, "share_plan_s": plan_s, "share_peak_mib": peak,
              "share_assign_max_bytes": max(sizes), "share_scatter_bytes": sum(sizes)}
    params = llama70b_params()
    for name, rank in (("first", 0), ("mid", ranks // 2 + 3)):
        boxes, itemsize = share_boxes(ranks, layout, rank, params)
        coordinated = out[rank].storage_data
        t0 = time.perf_counter()
        messages = 0
        for share_set in coordinated.share:
            mine = [boxes[t] for t in sorted(share_set.tensors)]  # every set's tensors are held
            messages += len(set_messages(share_set, mine, itemsize.__getitem__, coordinated.message_bytes))
        record[f"share_schedule_{name}_s"] = time.perf_counter() - t0
        record[f"share_messages_{name}"] = messages
    record["share_sets"] = len({s.id for p in out for s in p.storage_data.share})
    _emit(record)


def run_share(ranks: int, layout: str, base: str) -> dict:
    work = tempfile.mkdtemp(prefix=f"plan-scale-share-{ranks}-", dir=base)
    try:
        wire = share_requests(ranks, layout, llama70b_params())
        with open(os.path.join(work, "share.pkl"), "wb") as f:
            pickle.dump(wire, f)
        del wire
        return {"ranks": ranks, "layout": layout, **_child("share", work, str(ranks), layout)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


SHARE_COLUMNS = [
    ("ranks", "ranks", "{:d}"),
    ("layout", "layout", "{}"),
    ("share_sets", "sets", "{:,d}"),
    ("share_gather_bytes", "gather MB", "{:.1f}", 1e6),
    ("share_plan_s", "plan s", "{:.2f}"),
    ("share_peak_mib", "coord +MiB", "{:,.0f}"),
    ("share_assign_max_bytes", "rank KB", "{:.1f}", 1e3),
    ("share_scatter_bytes", "scatter MB", "{:.1f}", 1e6),
    ("share_messages_first", "msgs r0", "{:,d}"),
    ("share_schedule_first_s", "sched r0 s", "{:.3f}"),
    ("share_schedule_mid_s", "sched mid s", "{:.3f}"),
]


def share_table(ranks_list: list[int], layouts: list[str], base: str) -> list[dict]:
    """Print the share-planning rows (one per rank count and layout); returns their records."""
    print("\nRead once, share: planning with share_reads on (UCPReader.prepare_global_plan, then "
          "set_messages on two ranks)")
    for layout in layouts:
        print(f"  {layout}: {SHARE_LAYOUTS[layout]}")
    head = "".join(f"{h:>{_width(h)}}" for _, h, *_ in SHARE_COLUMNS)
    print(head)
    print("-" * len(head))
    records = []
    for ranks in ranks_list:
        for layout in layouts:
            record = run_share(ranks, layout, base)
            records.append(record)
            cells = []
            for key, heading, fmt, *div in SHARE_COLUMNS:
                value = record[key] / div[0] if div else record[key]
                cells.append(f"{fmt.format(value):>{_width(heading)}}")
            print("".join(cells), flush=True)
    print("gather: the ranks' pickled share requests; plan s / coord +MiB: the coordinator's "
          "prepare_global_plan and its peak memory above the gathered plans; rank KB: the largest "
          "rank's pickled assignment; scatter: all ranks' together; sched: one rank's schedule "
          "(rank 0, and rank ranks/2+3)")
    return records


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= n
    return tuple(reversed(out))


def _emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {args} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def run(ranks: int, tp: int, load_tp: int, stock_max: int, samples: int, base: str) -> dict:
    work = tempfile.mkdtemp(prefix=f"plan-scale-{ranks}-", dir=base)
    try:
        params = llama70b_params()
        synthetic = SyntheticPlans(ranks, tp, params)
        tables = synthetic.tables()
        wire = [pickle.dumps(SavePlan(RankLocalItems(), planner_data=t)) for t in tables]
        gathered = sum(len(w) for w in wire)
        with open(os.path.join(work, "plans.pkl"), "wb") as f:
            pickle.dump(wire, f)
        del wire
        del tables
        record = {"ranks": ranks, "gathered_plan_bytes": gathered}
        record.update(_child("coordinator", work))
        record["metadata_bytes"] = record["header_bytes"] + record["index_bytes"]
        record.update(_child("load", work, str(ranks), str(load_tp), str(ranks // 2 + 3), "0"))
        record.update(all_ranks_bytes(work, ranks, load_tp, samples))
        if ranks <= stock_max:
            record.update(stock_dcp(work, synthetic))
            stock_load = _child("load", work, str(ranks), str(load_tp), str(ranks // 2 + 3), "1")
            record.update({f"stock_{k}": v for k, v in stock_load.items()})
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


# (record key, heading, format[, divisor]); a column is as wide as its heading or COLUMN_WIDTH
COLUMN_WIDTH = 11  # "10,374,579" fragments at 8,192 ranks, and a space
COLUMNS = [
    ("ranks", "ranks", "{:d}"),
    ("fragments", "fragments", "{:,d}"),
    ("global_plan_s", "plan s", "{:.2f}"),
    ("commit_s", "commit s", "{:.2f}"),
    ("coordinator_peak_mib", "coord MiB", "{:,.0f}"),
    ("metadata_bytes", "metadata MB", "{:,.1f}", 1e6),
    ("header_bytes", "header MB", "{:.2f}", 1e6),
    ("broadcast_bytes", "bcast MB", "{:.2f}", 1e6),
    ("load_gather_bytes", "ld gather MB", "{:.1f}", 1e6),
    ("load_metadata_s", "ld meta s", "{:.2f}"),
    ("load_plan_s", "ld plan s", "{:.2f}"),
    ("load_peak_mib", "ld MiB", "{:,.0f}"),
    ("load_metadata_bytes_read", "ld read MB", "{:.2f}", 1e6),
    ("all_ranks_metadata_bytes_read", "all read GB", "{:.2f}", 1e9),
]


def _row(record: dict, prefix: str = "") -> str:
    cells = []
    for col in COLUMNS:
        key, _, fmt = col[:3]
        value = record.get(prefix + key, record.get(key) if key in ("ranks",) else None)
        if value is None:
            cells.append("-")
            continue
        if len(col) > 3:
            value = value / col[3]
        cells.append(fmt.format(value))
    return "".join(f"{c:>{_width(h)}}" for c, (_, h, *_) in zip(cells, COLUMNS))


def _width(heading: str) -> int:
    return max(len(heading) + 1, COLUMN_WIDTH)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--load-tp", type=int, default=4, help="TP degree of the loading layout (default 4)")
    p.add_argument("--stock-max-ranks", type=int, default=256,
                   help="run stock DCP only up to this many ranks (default 256)")
    p.add_argument("--samples", type=int, default=32, help="loading ranks routed exactly for the all-ranks sum")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the checkpoints' metadata")
    p.add_argument("--json", help="write one JSON record per rank count to this file")
    p.add_argument("--share", nargs="*", choices=sorted(SHARE_LAYOUTS), default=None,
                   help="also measure share planning (read once, share) for these layouts (default: all)")
    p.add_argument("--share-only", action="store_true", help="run only the share-planning rows")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        stage, work, *rest = args.child
        if stage == "coordinator":
            coordinator(work)
        elif stage == "share":
            share_coordinator(work, int(rest[0]), rest[1])
        elif stage == "load":
            load_one_rank(work, int(rest[0]), int(rest[1]), int(rest[2]), rest[3] == "1")
        return 0
    share_layouts = args.share or sorted(SHARE_LAYOUTS) if args.share is not None or args.share_only else []
    if args.share_only:
        records = share_table(args.ranks, share_layouts, args.dir)
        if args.json:
            with open(args.json, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return 0
    params = llama70b_params()
    print(f"Llama-70B shape: {len(params)} parameters -> {4 * len(params)} saved tensors per rank "
          f"(model, exp_avg, exp_avg_sq, step), bf16; save FSDP x TP={args.tp}, load FSDP x "
          f"TP={args.load_tp}; torch {torch.__version__}; {os.cpu_count()} CPUs")
    head = "".join(f"{h:>{_width(h)}}" for _, h, *_ in COLUMNS)
    print(head)
    print("-" * len(head))
    records = []
    for ranks in args.ranks:
        record = run(ranks, args.tp, args.load_tp, args.stock_max_ranks, args.samples, args.dir)
        records.append(record)
        print(_row(record), flush=True)
        if "stock_global_plan_s" in record:
            stock = {"ranks": ranks, "global_plan_s": record["stock_global_plan_s"],
                     "metadata_bytes": record["stock_metadata_bytes"],
                     "header_bytes": record["stock_metadata_bytes"],
                     "broadcast_bytes": record["stock_broadcast_bytes"],
                     "load_gather_bytes": record["stock_load_gather_bytes"],
                     "load_metadata_s": record["stock_load_metadata_s"],
                     "load_plan_s": record["stock_load_plan_s"],
                     "load_peak_mib": record["stock_load_peak_mib"],
                     "load_metadata_bytes_read": record["stock_load_metadata_bytes_read"],
                     "all_ranks_metadata_bytes_read": record["stock_all_ranks_metadata_bytes_read"]}
            print(_row(stock) + "   <- stock DCP", flush=True)
    print("\nplan s: coordinator global plan (unpickle every rank's plan + create_global_plan + "
          "prepare_global_plan); commit s: unpickle every rank's write result + UCPWriter.finish; "
          "coord MiB: coordinator peak RSS (process incl. torch); ld *: one loading rank; all read: "
          "metadata bytes read by all loading ranks together")
    if share_layouts:
        records += share_table(args.ranks, share_layouts, args.dir)
    if args.json:
        with open(args.json, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
