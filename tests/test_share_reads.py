"""Read once, share (issue 15): ranks that need the same bytes read them from storage once.

A checkpoint saved by 4 gloo ranks (FSDP ``Shard(0)``) is loaded by 4 ranks as HSDP 2x2
(``Replicate, Shard(0)``: two replica groups) and as DP=4 (every tensor replicated), from local
disk (bytes counted by the readers) and from S3 (moto, through a proxy that counts the bytes of
every GET response):

- with ``share_reads`` the ranks together read every needed byte once (1.0x the checkpoint's
  tensor bytes, up to checksum-block widening), against 2x (HSDP) and 4x (DP) without it;
- every tensor equals the saved one bit for bit, and ``verify_load`` agrees;
- large boxes are cut into parts (a small ``TORCH_UCP_SHARE_MESSAGE_BYTES``) dealt to every
  rank of the set, so the reading is spread;
- a corrupted byte in a shared fragment fails its reader's read and every rank it reads for
  gets :class:`~torch_ucp.SharedReadError` naming that rank and the tensor: no hang.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import torch_ucp
from tests.support import format_v2 as spec
from torch_ucp import UCPLoadPlanner, UCPReader
from torch_ucp.demo.launch import run_distributed
from torch_ucp.storage.sharing import ShareSet, plan_sharing, set_messages, split_box, summarize

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]

SHAPES = {"w": ((1024, 257), torch.float32), "w_odd": ((13, 7), torch.float32), "emb": ((10, 6), torch.bfloat16),
          "ids": ((9, 5), torch.int64), "mask": ((6, 4), torch.bool), "bias": ((11,), torch.float32)}
TOTAL = sum(math.prod(s) * d.itemsize for s, d in SHAPES.values())
MESSAGE_BYTES = 64 << 10  # "w" (1 MiB) is cut into 17 parts


def _full(name: str) -> torch.Tensor:
    shape, dtype = SHAPES[name]
    g = torch.Generator().manual_seed(len(name) * 1000 + shape[0])
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


def _state(kind: str, fill: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "fsdp":
        mesh, placements = init_device_mesh("cpu", (4,)), [Shard(0)]
    elif kind == "hsdp":
        mesh, placements = init_device_mesh("cpu", (2, 2)), [Replicate(), Shard(0)]
    else:
        mesh, placements = init_device_mesh("cpu", (4,)), [Replicate()]
    out = {}
    for name in SHAPES:
        full = _full(name) if fill else torch.zeros_like(_full(name))
        out[name] = distribute_tensor(full, mesh, placements, src_data_rank=None)
    return out


def _save(url: str, options: dict) -> None:
    torch.set_num_threads(1)
    torch_ucp.save(_state("fsdp", True), url, **options)


def _load(url: str, kind: str, share: bool, options: dict) -> dict:
    torch.set_num_threads(1)
    os.environ["TORCH_UCP_SHARE_MESSAGE_BYTES"] = str(MESSAGE_BYTES)
    state = _state(kind, False)
    reader = UCPReader(url, share_reads=share, verify_load=True, **options)
    dcp.load(state, storage_reader=reader, planner=UCPLoadPlanner())
    wrong = [n for n, t in state.items() if not torch.equal(t.full_tensor() if isinstance(t, DTensor) else t, _full(n))]
    return {"wrong": wrong, "read": reader.stats.bytes_read, "sent": reader.transfer_stats.bytes_sent,
            "messages": reader.transfer_stats.messages, "in_place": reader.transfer_stats.messages_in_place}


def _load_failing(url: str) -> dict:
    torch.set_num_threads(1)
    os.environ["TORCH_UCP_SHARE_MESSAGE_BYTES"] = str(MESSAGE_BYTES)
    try:
        dcp.load(_state("hsdp", False), storage_reader=UCPReader(url, share_reads=True), planner=UCPLoadPlanner())
    except CheckpointException as e:
        failures = {}
        for rank, failure in e.failures.items():
            error = failure[0] if isinstance(failure, tuple) else failure
            failures[str(rank)] = [type(error).__name__, str(error), getattr(error, "source_rank", None)]
        return failures
    return {}


# -- the plan -------------------------------------------------------------------------------------
def test_split_box_tiles_the_box() -> None:
    for offsets, lengths, itemsize, limit in [((0, 0), (10, 7), 4, 64), ((3, 2, 1), (5, 4, 9), 8, 100), ((5,), (1000,), 2, 64)]:
        parts = split_box(offsets, lengths, itemsize, limit)
        assert all(math.prod(n) * itemsize <= max(limit, itemsize) for _, n in parts)
        covered = {tuple(o + i for o, i in zip(off, idx)) for off, n in parts for idx in np.ndindex(*n)}
        expected = {tuple(o + i for o, i in zip(offsets, idx)) for idx in np.ndindex(*lengths)}
        assert covered == expected and sum(math.prod(n) for _, n in parts) == math.prod(lengths)


def test_the_default_and_its_knob(tmp_path, monkeypatch) -> None:
    from torch_ucp.storage.reader import share_by_default
    from torch_ucp.storage.store import open_store

    local, remote = open_store(str(tmp_path)), open_store("s3://bucket/ckpt", {"anon": True})
    monkeypatch.delenv("TORCH_UCP_SHARE_READS", raising=False)
    for setting in (None, "2"):  # the default: object stores over gloo, where it measures faster
        if setting:
            monkeypatch.setenv("TORCH_UCP_SHARE_READS", setting)
        assert share_by_default(remote, "cpu")
        assert not share_by_default(local, "cpu") and not share_by_default(remote, "cuda")
    monkeypatch.setenv("TORCH_UCP_SHARE_READS", "0")
    assert not any(share_by_default(s, t) for s in (local, remote) for t in ("cpu", "cuda"))
    monkeypatch.setenv("TORCH_UCP_SHARE_READS", "1")
    assert all(share_by_default(s, t) for s in (local, remote) for t in ("cpu", "cuda"))
    monkeypatch.setenv("TORCH_UCP_SHARE_READS", "3")
    with pytest.raises(ValueError, match="TORCH_UCP_SHARE_READS"):
        share_by_default(local, "cpu")


# -- local disk -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("share") / "ckpt")
    run_distributed(_save, 4, url, {})
    return url


def _load_all_ways(url: str) -> dict:
    """HSDP and DP loads, each with and without sharing, in one set of processes."""
    return {f"{kind}-{share}": _load(url, kind, share, {}) for kind in ("hsdp", "dp") for share in (True, False)}


def test_replicas_read_every_byte_once_from_local_disk(local: str) -> None:
    results = run_distributed(_load_all_ways, 4, local)
    for kind, copies in (("hsdp", 2), ("dp", 4)):
        shared = [r[f"{kind}-True"] for r in results]
        alone = [r[f"{kind}-False"] for r in results]
        for r in shared + alone:
            assert r["wrong"] == [], (kind, r)
        read_shared, read_alone = sum(r["read"] for r in shared), sum(r["read"] for r in alone)
        assert TOTAL <= read_shared <= 1.05 * TOTAL, (kind, read_shared, TOTAL)
        assert read_alone >= copies * TOTAL * 0.99, (kind, read_alone, TOTAL)
        assert all(r["read"] > 0 for r in shared), (kind, shared)  # parts dealt to every rank of a set
        assert max(r["read"] for r in shared) <= 1.5 * read_shared / 4 + MESSAGE_BYTES, (kind, shared)
        assert all(r["sent"] == 0 and r["messages"] == 0 for r in alone), (kind, alone)
        # pieces of "w" (contiguous rows of a local shard) travel in place, packed small tensors buffered
        assert 0 < sum(r["in_place"] for r in shared) < sum(r["messages"] for r in shared), (kind, shared)


def _load_recording_requests(url: str) -> dict:
    """FSDP loads (every tensor ``Shard(0)`` over the 4 ranks), then the same with ``bias``
    replicated: the share request a rank sends names only tensors another rank may need."""
    from torch.distributed.device_mesh import init_device_mesh

    class Recording(UCPReader):
        def prepare_local_plan(self, plan):
            out = super().prepare_local_plan(plan)
            self.requested = sorted(self.catalog().names[i] for i in out.storage_data.share.tensors.tolist())
            return out

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (4,))
    out = {}
    for replicated in ((), ("bias",)):
        state = {n: distribute_tensor(torch.zeros_like(_full(n)), mesh, [Replicate() if n in replicated else Shard(0)],
                                      src_data_rank=None) for n in SHAPES}
        reader = Recording(url, share_reads=True)
        dcp.load(state, storage_reader=reader, planner=UCPLoadPlanner())
        out[",".join(replicated) or "none"] = {
            "requested": reader.requested, "messages": reader.transfer_stats.messages,
            "wrong": [n for n, t in state.items() if not torch.equal(t.full_tensor(), _full(n))]}
    return out


def test_a_share_request_leaves_out_what_no_other_rank_needs(local: str) -> None:
    for r in run_distributed(_load_recording_requests, 4, local):
        assert r["none"] == {"requested": [], "messages": 0, "wrong": []}, r
        assert r["bias"]["requested"] == ["bias"] and r["bias"]["messages"] > 0 and r["bias"]["wrong"] == [], r


def test_a_failing_source_is_named_on_every_rank(local: str, tmp_path) -> None:
    import shutil

    url = str(tmp_path / "broken")
    shutil.copytree(local, url)
    header = spec.read_header(url)
    index = spec.read_index(url, header, 0)  # rank 0 wrote rows [0, 256) of "w"
    row = int((index["tensor_key"] == spec.tensor_key("w")).nonzero()[0][0])
    with open(os.path.join(url, index["names"][int(index["object"][row])]), "r+b") as f:
        f.seek(int(index["byte_offset"][row]) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    results = run_distributed(_load_failing, 4, url)
    failures = results[0]
    assert all(r == failures for r in results), results  # every rank raised, with the same failures
    assert all(kind == "SharedReadError" for kind, _, _ in failures.values()), failures
    readers = [int(r) for r, (_, _, source) in failures.items() if source == int(r)]
    assert len(readers) == 1, failures
    reader = readers[0]
    receivers = {int(r): text for r, (_, text, source) in failures.items() if int(r) != reader}
    assert receivers and all(failures[str(r)][2] == reader for r in receivers), failures
    assert "checksum mismatch in tensor 'w'" in failures[str(reader)][1]
    for text in receivers.values():
        assert f"rank {reader} reads them" in text and "checksum mismatch in tensor 'w'" in text, text


# -- S3 -------------------------------------------------------------------------------------------
def _load_both_layouts(url: str, share: bool, options: dict) -> dict:
    return {kind: _load(url, kind, share, options) for kind in ("hsdp", "dp")}


def test_replicas_read_every_byte_once_from_s3(s3_server, s3_bucket) -> None:
    """HSDP 2x2 then DP=4 in one set of processes, with and without sharing: the proxy sees
    1x + 1x the checkpoint's bytes with sharing, 2x + 4x without."""
    from tests.support.fault_proxy import FaultProxy

    bucket, options = s3_bucket
    url = f"{bucket}/ckpt"
    run_distributed(_save, 4, url, options)
    with FaultProxy(s3_server.endpoint_url, fail_rate=0.0) as proxy:
        via = proxy.storage_options(**{k: v for k, v in options.items() if k != "endpoint_url"})
        got = {}
        for share in (True, False):
            proxy.reset_stats()
            results = run_distributed(_load_both_layouts, 4, url, share, via)
            assert all(r[kind]["wrong"] == [] for r in results for kind in r), results
            got[share] = (proxy.get_bytes, {kind: sum(r[kind]["read"] for r in results) for kind in ("hsdp", "dp")})
    (shared_get, shared_read), (alone_get, alone_read) = got[True], got[False]
    for kind, copies in (("hsdp", 2), ("dp", 4)):
        assert TOTAL <= shared_read[kind] <= 1.05 * TOTAL and alone_read[kind] >= 0.99 * copies * TOTAL, got
    assert shared_get <= 2.1 * TOTAL and alone_get >= 5.9 * TOTAL, (got, TOTAL)  # headers and indexes too


def test_the_messages_balance_parts_over_a_set() -> None:
    share_set = ShareSet(3, (0, 1, 2, 3), frozenset({0}))
    messages = set_messages(share_set, [("w", (0, 0), (1024, 256))], lambda fqn: 4, 64 << 10)
    assert sum(p.nbytes for m in messages for p in m.parts) == 1024 * 256 * 4
    per_reader = [sum(m.nbytes for m in messages if m.reader == r) for r in range(4)]
    assert per_reader == [256 << 10] * 4 and all(m.nbytes <= 64 << 10 for m in messages)
    assert [m.order for m in messages] == [(3, i) for i in range(len(messages))]
    assert [m.reader for m in messages] == [0, 1, 2, 3] * 4  # the members' messages in turn


def test_the_coordinator_groups_ranks_with_the_same_boxes() -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    def item(fqn: str, row: int) -> ReadItem:  # rows [row, row + 4) of an (8, 3) tensor
        return ReadItem(LoadItemType.TENSOR, MetadataIndex(fqn, (row, 0)), (0, 0), MetadataIndex(fqn, (row, 0)),
                        (0, 0), (4, 3))

    position = {"a": 0, "norm": 1}
    # HSDP 2x2: ranks 0 and 2 hold rows 0-3 of "a", ranks 1 and 3 rows 4-7; all hold "norm" whole
    requests = [summarize(r, 4, [item("a", 4 * (r % 2)), item("norm", 0), item("norm", 4)], position)
                for r in range(4)]
    sets = plan_sharing(requests, 4)
    assert sets is not None
    assert [[(tuple(s.members), sorted(s.tensors)) for s in mine] for mine in sets] == [
        [((0, 1, 2, 3), [1]), ((0, 2), [0])],
        [((0, 1, 2, 3), [1]), ((1, 3), [0])],
        [((0, 1, 2, 3), [1]), ((0, 2), [0])],
        [((0, 1, 2, 3), [1]), ((1, 3), [0])],
    ]
    assert plan_sharing(requests[:3] + [None], 4) is None  # a rank that does not share
    assert plan_sharing(requests, 8) is None  # the reader's group is not dcp.load's


def _plain_sets(requests: list) -> dict[int, list]:
    """The plain definition: ranks with the same digest for a tensor share it; tensors are
    grouped by those ranks; set ids in the order of the sorted rank lists."""
    holders: dict[tuple[int, int], list[int]] = {}
    for q in requests:
        for t, d in zip(q.tensors.tolist(), q.digests.tolist()):
            holders.setdefault((t, d), []).append(q.rank)
    by_members: dict[tuple[int, ...], set[int]] = {}
    for (t, _), holding in holders.items():
        if len(holding) > 1:
            by_members.setdefault(tuple(sorted(holding)), set()).add(t)
    expected: dict[int, list] = {q.rank: [] for q in requests}
    for i, members in enumerate(sorted(by_members)):
        for m in members:
            expected[m].append((i, members, by_members[members]))
    return expected


def _planned_sets(requests: list) -> tuple[dict[int, list], list]:
    sets = plan_sharing(list(reversed(requests)), len(requests))
    assert sets is not None
    got = {q.rank: [(s.id, tuple(s.members), set(s.tensors)) for s in mine] for q, mine in zip(reversed(requests), sets)}
    return got, sets


def test_the_coordinator_groups_like_the_plain_definition() -> None:
    """Random requests (a subgroup's global ranks, tensors needed by a random subset with a
    random choice of boxes, some ranks replicas of others): the sets are the plain
    definition's, evenly spaced ranks sent as a ``range``."""
    from torch_ucp.storage.sharing import ShareRequest

    rng = np.random.default_rng(3)
    ranks = [5 + 3 * i for i in range(12)] + [50, 51, 60]
    requests = []
    for r in ranks:
        tensors = np.flatnonzero(rng.random(40) < 0.8)
        requests.append(ShareRequest(r, len(ranks), tensors, rng.integers(0, 3, len(tensors)).astype(np.uint64)))
    for i, r in enumerate([70, 71, 75]):  # replicas: the same request as an earlier rank
        requests.append(ShareRequest(r, 0, requests[2 * i].tensors, requests[2 * i].digests))
    ranks += [70, 71, 75]
    requests = [ShareRequest(q.rank, len(ranks), q.tensors, q.digests) for q in requests]
    got, sets = _planned_sets(requests)
    assert got == _plain_sets(requests)
    kinds = {type(s.members) for mine in sets for s in mine}
    assert kinds == {range, tuple}, kinds  # the 3-spaced ranks as a range, the rest listed


@pytest.mark.parametrize("shared_tensor", [False, True])
def test_the_coordinator_without_replicas(shared_tensor: bool) -> None:
    """No two ranks with the same request (an FSDP or TP load): no sets at all (the early way
    out), or, where one tensor's boxes repeat (a TP-replicated norm), only that tensor's set."""
    from torch_ucp.storage.sharing import ShareRequest

    rng = np.random.default_rng(5)
    requests = [ShareRequest(r, 16, np.arange(30, dtype=np.int32), rng.integers(0, 2**63, 30, dtype=np.uint64))
                for r in range(16)]
    if shared_tensor:
        for q in requests[1::2]:
            q.digests[7] = requests[0].digests[7]
    got, _ = _planned_sets(requests)
    assert got == _plain_sets(requests)
    assert sum(map(len, got.values())) == (9 if shared_tensor else 0)  # rank 0 and the 8 odd ranks


def test_dealing_is_the_least_loaded_member_first() -> None:
    """The heap deal equals the plain rule (each part to the member dealt the fewest bytes so
    far, lowest rank on ties), uneven part sizes and empty parts included."""
    import math as _math

    share_set = ShareSet(0, (2, 3, 7, 9, 11), frozenset({0}))
    boxes = [("a", (0, 0), (37, 100)), ("b", (0,), (0,)), ("c", (0, 0), (5, 1000)), ("d", (0,), (3,))]
    size = {"a": 4, "b": 4, "c": 2, "d": 8}
    messages = set_messages(share_set, boxes, size.__getitem__, 1000)
    load = dict.fromkeys(share_set.members, 0)
    expected = []
    for box in sorted(boxes):
        for offsets, lengths in split_box(box[1], box[2], size[box[0]], 1000):
            reader = min(share_set.members, key=lambda m: (load[m], m))
            load[reader] += _math.prod(lengths) * size[box[0]]
            expected.append((reader, box, offsets, lengths))
    got = [(m.reader, p.box, p.offsets, p.lengths) for m in messages for p in m.parts]
    assert sorted(got) == sorted(expected)
    for reader in share_set.members:  # each member's parts in dealing order
        assert [g for g in got if g[0] == reader] == [e for e in expected if e[0] == reader]


def _random_schedule(bounds: list[int]) -> list[dict]:
    """Every rank runs the same random schedule (messages of random sets, readers and sizes)
    with each of ``bounds`` bytes of buffers, every other message in place (read, sent and
    received in a target of its own): every message arrives intact, in place where it has one."""
    import random

    from torch_ucp.storage.share_transfer import ShareTransfers
    from torch_ucp.storage.sharing import Message, Part

    rank = dist.get_rank()
    rng = random.Random(7)
    messages = []
    for set_id in range(6):
        members = tuple(sorted(rng.sample(range(4), rng.randint(2, 4))))
        for i in range(rng.randint(1, 8)):
            n = rng.randint(1, 3000)
            messages.append(Message((set_id, i), rng.choice(members), members,
                                    (Part(("t", (0,), (n,)), (0,), (n,), n, 0),), n))
    mine = [m for m in messages if rank in m.members]

    def content(m: Message) -> torch.Tensor:
        g = torch.Generator().manual_seed(m.order[0] * 100 + m.order[1])
        return torch.randint(0, 256, (m.nbytes,), generator=g, dtype=torch.uint8)

    def read(m: Message, payload: torch.Tensor) -> None:
        payload.copy_(content(m))

    def run(inflight: int) -> dict:
        got = {}
        homes = {m.order: torch.zeros(m.nbytes, dtype=torch.uint8) for m in mine if m.order[1] % 2}

        def deliver(m: Message, payload: torch.Tensor) -> None:
            home = homes.get(m.order)
            got[m.order] = torch.equal(payload, content(m)) and (home is None or payload.data_ptr() == home.data_ptr())

        ShareTransfers(rank, None, torch.device("cpu"), inflight, 3).run(
            list(reversed(mine)), read, deliver, lambda m: homes.get(m.order))
        filled = all(torch.equal(h, content(m)) for m in mine if (h := homes.get(m.order)) is not None)
        return {"delivered": len(got), "expected": len(mine), "intact": all(got.values()),
                "in place": len(homes), "homes filled": filled}

    return [run(inflight) for inflight in bounds]


def test_any_schedule_completes_within_any_memory_bound() -> None:
    for per_rank in run_distributed(_random_schedule, 4, [1, 1 << 20]):
        for r in per_rank:
            assert r["delivered"] == r["expected"] > 0 and r["intact"], r
            assert r["in place"] > 0 and r["homes filled"], r
