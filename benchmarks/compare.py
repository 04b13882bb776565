"""torch_ucp against stock DCP on the same generated sharded state, in one run.

    python benchmarks/compare.py [--size-gib 1.0] [--world-size 2] [--dir /tmp/ucp-bench]
                                 [--s3-size-gib 0.25] [--s3-bandwidth-mbs MB/s ...]
                                 [--only content-hash|share]

Prints the machine, then one table:

* the disk's ceiling: sequential write (fsynced) and read of a file of the state's size (at
  most 1 GiB) in ``--dir``, 16 MiB blocks with ``O_DIRECT`` from one thread, like
  ``dd bs=16M oflag=direct`` (buffered where ``O_DIRECT`` is refused, said in the notes);
* save and same-layout load on local disk (torch_ucp vs FileSystemWriter / FileSystemReader
  with DCP's defaults and with 4 threads), torch_ucp also with ``verify=False``: what verifying
  every byte read costs;
* two resharded loads, with bytes read per bytes needed: saved Shard(0) over 4 ranks, loaded
  Shard(1) over 2 ranks (torch_ucp also with ``verify=False``); and saved as FSDP2 over tensor
  parallelism on a (dp=2, tp=2) mesh, loaded as FSDP (Shard(0)) over 2 ranks;
* asynchronous save (``torch_ucp.async_save`` vs ``dcp.async_save``): how long the caller is
  blocked, against the synchronous save of the same system;
* the layout-independent content hash (:mod:`torch_ucp.metadata.content_hash`): its speed on
  one core over a contiguous fragment (as a save hashes it) and over a column box (as a
  ``Shard(1)`` load checks it), what it costs a save (against ``content_hash=False``) and what
  ``verify_load=True`` costs a load (against the default);
* save and load through S3 (a local moto server; ``--s3-size-gib 0`` skips them);
* replicated loads (4 ranks as HSDP: 2 replicas of 2 shards) with and without ``share_reads``,
  from local disk and from S3 (moto, through a proxy counting the bytes of GET responses):
  seconds, and bytes read from storage per byte of the checkpoint (the distinct bytes needed);
  with ``--s3-bandwidth-mbs`` also from S3 behind a proxy that limits the response bodies of all
  connections together to each given rate (MB/s = 10^6 bytes/s): a store whose bandwidth, not
  this machine's CPUs, is the limit.

Every save is durable when it returns (both systems fsync). The page cache is dropped before
every load (as root). For the resharded loads it reports bytes *requested* per byte needed
(stock: ``rchar`` of its read calls; torch_ucp: its reader's own count, since memory-mapped
copies bypass read calls) and bytes fetched *from disk* (``read_bytes``, both systems; on one
host the page cache serves a chunk file read by two ranks once). Loads are verified bit-exact.

``peak RSS MiB``: the largest resident-memory increase of a rank during the operation over its
RSS before it (kernel high-water mark ``VmHWM``, reset before the operation), worst rank. It
counts every resident page, including pages of files a rank maps into memory (page cache the
kernel can reclaim; ``read()`` calls fill the page cache too but do not count): where those are
16 MiB or more, the notes say how much. For asynchronous saves it covers both saves, from the
call to the committed checkpoint (staging memory counts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement, _StridedShard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from async_save_bench import _Saving  # noqa: E402
from support_measure import PeakRSSIncrease, disk_bandwidth, drop_caches, machine_summary  # noqa: E402

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter  # noqa: E402
from torch_ucp.asynchronous import AsyncSaver  # noqa: E402
from torch_ucp.demo.launch import run_distributed  # noqa: E402

COLS = 4096
FSDP2_TP = "fsdp2+tp"  # the (dp=2, tp=2) layout; see _placements
HSDP = "hsdp"  # (replicas=2, shards=world/2): Replicate, Shard(0)
DISK_THREADS = 1  # matches `dd bs=16M oflag=direct` here (2 threads: the same within noise)
MAPPED_NOTE_BYTES = 16 << 20  # notes say how much of a peak RSS is mapped file pages above this
NOVERIFY = "ucp-noverify"  # torch_ucp loading with verify=False


class Memory(NamedTuple):
    """Peak RSS increase of an operation and the part of it that is memory-mapped file pages,
    bytes, worst rank of each."""

    rss: int
    mapped: int


class Row(NamedTuple):
    op: str
    system: str
    seconds: float
    gbps: float | None
    ratio: float | None  # stock DCP's time over this row's, same operation
    memory: Memory | None
    note: str = ""


def _rchar() -> int:
    """Bytes this process asked read calls for (stock DCP reads whole chunk files)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def _bytes_read() -> int:
    """Bytes this process made the kernel fetch from storage (``read_bytes``: counts reads and
    page faults of memory maps alike; meaningful with a cold page cache)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _tensors(size_bytes: int) -> dict[str, tuple[int, int]]:
    per = 64 << 20
    n = max(1, size_bytes // per)
    rows = per // (COLS * 4)
    return {f"layer{i}.weight": (rows, COLS) for i in range(n)}


def _full(name: str, shape: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


def _mesh(layout: str) -> DeviceMesh:
    if layout == FSDP2_TP:
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    if layout == HSDP:
        return init_device_mesh("cpu", (2, dist.get_world_size() // 2))
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _placements(layout: str, index: int) -> list[Placement]:
    """``shard0`` / ``shard1``: ``Shard(dim)`` on a 1-D mesh. ``fsdp2+tp``: what FSDP2
    (``fully_shard`` on dp, dim 0) makes of tensor-parallel weights: row-wise ones (even
    tensors, ``Shard(1)`` on tp) get ``Shard(0)`` on dp; column-wise ones (odd tensors,
    ``Shard(0)`` on tp) get ``_StridedShard(0, split_factor=2)`` on dp."""
    if layout == FSDP2_TP:
        return [Shard(0), Shard(1)] if index % 2 == 0 else [_StridedShard(0, split_factor=2), Shard(0)]
    if layout == HSDP:
        return [Replicate(), Shard(0)]
    return [Shard(int(layout.removeprefix("shard")))]


def _state(size_bytes: int, layout: str, fill: bool) -> dict[str, Any]:
    mesh = _mesh(layout)
    return {
        name: distribute_tensor(_full(name, shape) if fill else torch.zeros(shape), mesh,
                                _placements(layout, i), src_data_rank=None)
        for i, (name, shape) in enumerate(_tensors(size_bytes).items())
    }


def _timed(fn: Callable[[], Any]) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _writer(system: str, path: str, options: dict[str, Any]):
    """``ucp``; stock ``dcp`` / ``dcp-4t`` (FileSystemWriter, 1 or 4 threads); stock
    ``fsspec`` (FsspecWriter; sync_files off: s3fs files have no fileno, pytorch#142396)."""
    if system == "ucp":
        return UCPWriter(path, **options)
    threads = 4 if system.endswith("-4t") else 1
    if system.startswith("fsspec"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(path, thread_count=threads, sync_files=False, **options)
    return dcp.FileSystemWriter(path, thread_count=threads)


def _reader(system: str, path: str, options: dict[str, Any]):
    if system == "ucp":
        return UCPReader(path, **options)
    if system == NOVERIFY:
        return UCPReader(path, verify=False, **options)
    if system.startswith("fsspec"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path, **options)
    return dcp.FileSystemReader(path)


def _memory_fields(rss: PeakRSSIncrease) -> dict[str, int]:
    return {"rss": rss.increase, "rss_mapped": rss.mapped_increase}


def save_rank(system: str, path: str, size_bytes: int, layout: str,
              options: dict | None = None) -> dict[str, float]:
    state = _state(size_bytes, layout, fill=True)
    writer = _writer(system, path, options or {})
    planner = UCPSavePlanner() if system == "ucp" else None
    with PeakRSSIncrease() as rss:
        seconds = _timed(lambda: dcp.save(state, storage_writer=writer, planner=planner))
    return {"seconds": seconds, **_memory_fields(rss)}


def load_rank(system: str, path: str, size_bytes: int, layout: str,
              options: dict | None = None) -> dict[str, Any]:
    state = _state(size_bytes, layout, fill=False)
    before, before_calls = _bytes_read(), _rchar()
    reader = _reader(system, path, options or {})
    planner = UCPLoadPlanner() if system in ("ucp", NOVERIFY) else None
    with PeakRSSIncrease() as rss:
        seconds = _timed(lambda: dcp.load(state, storage_reader=reader, planner=planner))
    read = _bytes_read() - before
    # requested: torch_ucp counts its range reads itself (memory-mapped copies bypass rchar)
    requested = reader.stats.bytes_read if system in ("ucp", NOVERIFY) else _rchar() - before_calls
    needed = sum(t.to_local().numel() * 4 for t in state.values())
    shared = reader.transfer_stats.bytes_received if system in ("ucp", NOVERIFY) else 0
    ok = all(torch.equal(t.full_tensor(), _full(n, tuple(t.shape))) for n, t in state.items())
    return {"seconds": seconds, **_memory_fields(rss), "read": read, "requested": requested,
            "needed": needed, "shared": shared, "ok": ok}


def async_save_rank(system: str, base: str, size_bytes: int) -> dict[str, float]:
    """Two asynchronous saves of the same Shard(0) state, each waited for before the next: the
    caller's blocked time of the first (torch_ucp allocates its staging pool and checkpoint
    process group then) and of the second; peak RSS over both, up to the committed checkpoint."""
    state = _state(size_bytes, "shard0", fill=True)
    group = dist.new_group(backend="gloo") if system == "dcp" else None
    saver = AsyncSaver()
    saving = _Saving("async ucp" if system == "ucp" else "async stock", saver, None, group)
    blocked = []
    with PeakRSSIncrease() as rss:
        for i in range(2):
            dist.barrier()
            t0 = time.perf_counter()
            done, _ = saving.start(state, os.path.join(base, f"save-{i}"))
            blocked.append(time.perf_counter() - t0)
            done.result()
    saver.close()
    return {"blocked_first": blocked[0], "blocked": blocked[1], **_memory_fields(rss)}


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _worst(results: list[dict[str, Any]], key: str) -> Any:
    return max(r[key] for r in results)


def _memory(results: list[dict[str, Any]]) -> Memory:
    return Memory(_worst(results, "rss"), _worst(results, "rss_mapped"))


def _label(system: str) -> str:
    return {"ucp": "torch_ucp", NOVERIFY: "ucp noverif"}.get(system, system)


def _verify_note(secs: dict[str, float], total: int) -> str:
    """What verifying every delivered byte cost: the default load against ``verify=False``."""
    cost = secs["ucp"] / secs[NOVERIFY] - 1
    return (f"verify=True: {100 * cost:+.0f}% time vs verify=False "
            f"({_gbps(total, secs['ucp']):.2f} vs {_gbps(total, secs[NOVERIFY]):.2f} GB/s)")


def _disk_rows(directory: str, total: int) -> list[Row]:
    disk = disk_bandwidth(directory, min(total, 1 << 30), threads=DISK_THREADS)
    write_note, read_note = disk.notes()
    return [
        Row("disk seq write (O_DIRECT)", "disk", disk.write_seconds, disk.write_gbps, None, None, write_note),
        Row("disk seq read (O_DIRECT)", "disk", disk.read_seconds, disk.read_gbps, None, None, read_note),
    ]


def _save_rows(path: Callable[[str], str], size: int, total: int, ws: int,
               disk_write_gbps: float) -> tuple[list[Row], dict[str, float]]:
    """Save rows, and each system's save seconds (kept for the async rows)."""
    res = {system: run_distributed(save_rank, ws, system, path(f"same-{system}"), size, "shard0")
           for system in ("dcp", "dcp-4t", "ucp")}
    secs = {system: _worst(r, "seconds") for system, r in res.items()}
    rows = [Row("save", system, secs[system], _gbps(total, secs[system]), 1.0, _memory(res[system]))
            for system in ("dcp", "dcp-4t")]
    ucp_gbps = _gbps(total, secs["ucp"])
    rows.append(Row("save", "torch_ucp", secs["ucp"], ucp_gbps, secs["dcp"] / secs["ucp"],
                    _memory(res["ucp"]),
                    f"{secs['dcp-4t'] / secs['ucp']:.2f}x vs dcp-4t, "
                    f"{100 * ucp_gbps / disk_write_gbps:.0f}% of disk write"))
    return rows, secs


def _same_layout_load_rows(path: Callable[[str], str], size: int, total: int, ws: int) -> list[Row]:
    res = {}
    systems = ("dcp", "dcp-4t", "ucp", NOVERIFY)
    for system in systems:
        src = "ucp" if system in ("ucp", NOVERIFY) else "dcp"
        drop_caches()
        res[system] = run_distributed(load_rank, ws, system, path(f"same-{src}"), size, "shard0")
        assert all(r["ok"] for r in res[system]), f"{system}: same-layout load mismatch"
    secs = {system: _worst(r, "seconds") for system, r in res.items()}
    return [Row("load same layout", _label(system), secs[system], _gbps(total, secs[system]),
                secs["dcp"] / secs[system], _memory(res[system]),
                _verify_note(secs, total) if system == "ucp" else "")
            for system in systems]


def _reshard_rows(label: str, path: Callable[[str], str], size: int, total: int,
                  saved: tuple[str, int], loaded: tuple[str, int], noverify: bool = False) -> list[Row]:
    """Save with ``saved = (layout, world size)``, load cold with ``loaded``; verified.
    ``noverify``: torch_ucp also with ``verify=False``."""
    res = {}
    for system in ("dcp", "ucp"):
        run_distributed(save_rank, saved[1], system, path(f"{saved[0]}-{system}"), size, saved[0])
    systems = ("dcp", "ucp", NOVERIFY) if noverify else ("dcp", "ucp")
    for system in systems:
        src = "dcp" if system == "dcp" else "ucp"
        drop_caches()
        res[system] = run_distributed(load_rank, loaded[1], system, path(f"{saved[0]}-{src}"),
                                      size, loaded[0])
        assert all(r["ok"] for r in res[system]), f"{system}: {label} mismatch"
    rows = []
    secs = {system: _worst(r, "seconds") for system, r in res.items()}
    for system in systems:
        r = res[system]
        s, needed = secs[system], sum(x["needed"] for x in r)
        requested, read = sum(x["requested"] for x in r), sum(x["read"] for x in r)
        note = f"requested/needed {requested / needed:.2f}, from disk {read / needed:.2f}"
        if system == "ucp" and noverify:
            note += "; " + _verify_note(secs, total)
        rows.append(Row(label, _label(system), s, _gbps(total, s), secs["dcp"] / s, _memory(r), note))
    return rows


def _content_hash_rows(path: Callable[[str], str], size: int, total: int, ws: int) -> list[Row]:
    """The content hash on one core, and its share of a save and of a load (same run)."""
    from torch_ucp.metadata.content_hash import bytes_hash, tensor_hash

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # numpy's ufuncs run on one core anyway
    frag = _full("hash", (min(size, 256 << 20) // (COLS * 4), COLS))
    rows = []
    t0 = time.perf_counter()
    bytes_hash(memoryview(frag.numpy()).cast("B"), 4, (0, 0), frag.shape, frag.shape)
    s = time.perf_counter() - t0
    rows.append(Row("content hash, 1 core", "torch_ucp", s, _gbps(frag.nbytes, s), None, None,
                    f"contiguous {frag.nbytes >> 20} MiB fragment (save)"))
    box = frag[:, : COLS // 2].contiguous()
    t0 = time.perf_counter()
    tensor_hash(box, (0, 0), frag.shape)
    s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    rows.append(Row("content hash, 1 core", "torch_ucp", s, _gbps(box.nbytes, s), None, None,
                    f"column box {box.shape[0]}x{box.shape[1]} of {frag.shape[1]} columns (Shard(1) load)"))
    saves: dict[bool, list[float]] = {False: [], True: []}
    memory = {}
    for _ in range(2):  # alternated, best of two: a save's time varies more than the hash costs
        for hashed in (False, True):
            r = run_distributed(save_rank, ws, "ucp", path(f"hash-{hashed}"), size, "shard0",
                                {"content_hash": hashed, "overwrite": True})
            saves[hashed].append(_worst(r, "seconds"))
            memory[hashed] = _memory(r)
    plain, hashed_s = min(saves[False]), min(saves[True])
    rows.append(Row("save content_hash=False", "torch_ucp", plain, _gbps(total, plain), None, memory[False],
                    f"best of 2; the default (hashing) {hashed_s:.2f} s, {100 * (hashed_s / plain - 1):+.0f}% time"))
    res = {}
    for name, options in (("default", {}), ("verify_load", {"verify_load": True})):
        drop_caches()
        res[name] = run_distributed(load_rank, ws, "ucp", path("hash-True"), size, "shard0", options)
        assert all(r["ok"] for r in res[name]), f"{name}: load mismatch"
    base, checked = _worst(res["default"], "seconds"), _worst(res["verify_load"], "seconds")
    rows.append(Row("load verify_load=True", "torch_ucp", checked, _gbps(total, checked), None,
                    _memory(res["verify_load"]),
                    f"{100 * (checked / base - 1):+.0f}% time vs the default load ({base:.2f} s)"))
    return rows


def _async_rows(path: Callable[[str], str], size: int, ws: int, sync_s: dict[str, float]) -> list[Row]:
    """Blocked seconds of the second of two async saves (steady state), against the sync save."""
    res = {system: run_distributed(async_save_rank, ws, system, path(f"async-{system}"), size)
           for system in ("dcp", "ucp")}
    base = _worst(res["dcp"], "blocked")
    rows = []
    for system in ("dcp", "ucp"):
        blocked, sync = _worst(res[system], "blocked"), sync_s[system]
        rows.append(Row("async save (caller blocked)", _label(system), blocked, None, base / blocked,
                        _memory(res[system]),
                        f"{100 * blocked / sync:.0f}% of its sync save ({sync:.2f} s); "
                        f"1st call {_worst(res[system], 'blocked_first'):.2f} s"))
    return rows


def _s3_rows(size: int, ws: int) -> list[Row]:
    from tests.support.fault_proxy import RETRY_STORAGE_OPTIONS
    from tests.support.s3 import S3Server

    total = sum(r * c * 4 for r, c in _tensors(size).values())
    rows = []
    with S3Server() as server:
        bucket = server.create_bucket()
        options = server.storage_options(**RETRY_STORAGE_OPTIONS)
        print(f"S3 (moto server on 127.0.0.1): {total / 2**30:.2f} GiB over {ws} ranks", flush=True)
        res: dict[str, dict[str, list[dict[str, Any]]]] = {"save": {}, "load": {}}
        for system in ("fsspec", "ucp"):
            url = f"s3://{bucket}/{system}"
            res["save"][system] = run_distributed(save_rank, ws, system, url, size, "shard0", options)
            res["load"][system] = run_distributed(load_rank, ws, system, url, size, "shard0", options)
            assert all(r["ok"] for r in res["load"][system]), f"{system}: S3 load mismatch"
        for op in ("save", "load"):
            base, ucp = _worst(res[op]["fsspec"], "seconds"), _worst(res[op]["ucp"], "seconds")
            rows.append(Row(f"S3 {op}", "fsspec", base, _gbps(total, base), 1.0,
                            _memory(res[op]["fsspec"]), "FsspecWriter/Reader"))
            rows.append(Row(f"S3 {op}", "torch_ucp", ucp, _gbps(total, ucp), base / ucp,
                            _memory(res[op]["ucp"]), "vs FsspecWriter/Reader"))
    return rows


def _share_rows(size: int, path: Callable[[str], str], s3: bool,
                bandwidths_mbs: tuple[float, ...] = ()) -> list[Row]:
    """HSDP 2x2 loads of a Shard(0)x4 checkpoint, with and without ``share_reads``: local disk
    (bytes: the readers' own counts) and S3 (bytes: GET bodies at a counting proxy), also with
    the proxy limiting the bodies of all connections together to each of ``bandwidths_mbs``."""
    total = sum(r * c * 4 for r, c in _tensors(size).values())
    rows = []

    def measure(where: str, url: str, options: dict[str, Any], counted: Callable[[], int] | None,
                reset: Callable[[], None]) -> None:
        res = {}
        fetched = {}
        for share in (False, True):
            if counted is None:
                drop_caches()
            reset()
            res[share] = run_distributed(load_rank, 4, "ucp", url, size, HSDP, {**options, "share_reads": share})
            assert all(r["ok"] for r in res[share]), f"{where}: replicated load mismatch"
            fetched[share] = counted() if counted is not None else sum(r["requested"] for r in res[share])
        base = _worst(res[False], "seconds")
        for share in (False, True):
            s = _worst(res[share], "seconds")
            sent = sum(r["shared"] for r in res[share])
            rows.append(Row(f"{where} load HSDP 2x2 (4 ranks)", "share" if share else "per replica", s,
                            _gbps(total, s), None, _memory(res[share]),
                            f"storage bytes {fetched[share] / total:.2f}x the checkpoint"
                            + (f", {sent / total:.2f}x received from other ranks; {base / s:.2f}x faster than "
                               "per replica" if share else "")))

    url = path("share-src")
    run_distributed(save_rank, 4, "ucp", url, size, "shard0")
    measure("local", url, {}, None, lambda: None)
    if s3:
        from tests.support.fault_proxy import RETRY_STORAGE_OPTIONS, FaultProxy
        from tests.support.s3 import S3Server

        with S3Server() as server:
            bucket = server.create_bucket()
            url = f"s3://{bucket}/share"
            options = server.storage_options(**RETRY_STORAGE_OPTIONS)
            run_distributed(save_rank, 4, "ucp", url, size, "shard0", options)
            for mbs in (None, *bandwidths_mbs):
                bandwidth = None if mbs is None else mbs * 1e6
                with FaultProxy(server.endpoint_url, fail_rate=0.0, bandwidth=bandwidth) as proxy:
                    via = proxy.storage_options(**{k: v for k, v in options.items() if k != "endpoint_url"})
                    measure("S3" if mbs is None else f"S3 at {mbs:g} MB/s", url, via,
                            lambda: proxy.get_bytes, proxy.reset_stats)
    return rows


def _notes(row: Row) -> str:
    """The row's note, plus the memory-mapped part of its peak RSS where that is sizeable."""
    notes = [row.note] if row.note else []
    if row.memory is not None and row.memory.mapped >= MAPPED_NOTE_BYTES:
        notes.append(f"RSS: {row.memory.mapped / 2**20:.0f} MiB of it mapped file pages")
    return "; ".join(notes)


def format_table(rows: list[Row]) -> str:
    def cell(v: float | None, fmt: str, width: int) -> str:
        return (format(v, fmt) if v is not None else "-").rjust(width)

    header = f"{'operation':<40}{'system':<11}{'s':>7}{'GB/s':>7}{'vs dcp':>8}{'peak RSS MiB':>14}  notes"
    lines = [header, "-" * 120]
    for r in rows:
        rss = r.memory.rss / 2**20 if r.memory is not None else None
        lines.append(f"{r.op:<40}{r.system:<11}{cell(r.seconds, '.2f', 7)}{cell(r.gbps, '.2f', 7)}"
                     f"{cell(r.ratio, '.2f', 7)}{'x' if r.ratio is not None else ' '}"
                     f"{cell(rss, '.0f', 14)}  {_notes(r)}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dir", default="/tmp/torch-ucp-bench")
    p.add_argument("--s3-size-gib", type=float, default=0.25,
                   help="state size for the S3 rows (0 to skip); a local moto server is started")
    p.add_argument("--s3-bandwidth-mbs", type=float, nargs="*", default=[], metavar="MB/s",
                   help="also measure the replicated S3 loads behind a proxy limiting all response "
                        "bodies together to each of these rates (10^6 bytes/s)")
    p.add_argument("--only", choices=["content-hash", "share"],
                   help="only these rows (the content hash at --size-gib; shared reads at --s3-size-gib, "
                        "or --size-gib on local disk alone when that is 0)")
    args = p.parse_args()
    size = int(args.size_gib * 2**30)
    total = sum(r * c * 4 for r, c in _tensors(size).values())
    ws = args.world_size
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)

    def path(name: str) -> str:
        return os.path.join(args.dir, name)

    print(machine_summary(args.dir))
    print(f"state: {total / 2**30:.2f} GiB float32 over {ws} ranks, dir {args.dir}", flush=True)
    cold = drop_caches()
    if args.only:
        if args.only == "content-hash":
            rows = _content_hash_rows(path, size, total, ws)
        else:
            rows = _share_rows(int((args.s3_size_gib or args.size_gib) * 2**30), path, s3=args.s3_size_gib > 0,
                              bandwidths_mbs=tuple(args.s3_bandwidth_mbs))
        print(format_table(rows))
        shutil.rmtree(args.dir, ignore_errors=True)
        return 0
    rows = _disk_rows(args.dir, total)
    save_rows, save_s = _save_rows(path, size, total, ws, rows[0].gbps)
    rows += save_rows
    rows += _same_layout_load_rows(path, size, total, ws)
    rows += _reshard_rows("load Shard(0)x4 -> Shard(1)x2", path, size, total, ("shard0", 4), ("shard1", 2),
                          noverify=True)
    rows += _reshard_rows("load FSDP2+TP 2x2 -> FSDP x2", path, size, total, (FSDP2_TP, 4), ("shard0", 2))
    rows += _content_hash_rows(path, size, total, ws)
    rows += _async_rows(path, size, ws, save_s)
    if args.s3_size_gib > 0:
        rows += _s3_rows(int(args.s3_size_gib * 2**30), ws)
    rows += _share_rows(int((args.s3_size_gib or args.size_gib) * 2**30), path, s3=args.s3_size_gib > 0,
                        bandwidths_mbs=tuple(args.s3_bandwidth_mbs))

    print()
    print("loads read from " + ("disk (page cache dropped before each)" if cold else "a warm page cache"))
    print(format_table(rows))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
