"""torch_ucp against stock DCP on the same generated sharded state, in one run.

    python benchmarks/compare.py [--size-gib 1.0] [--world-size 2] [--dir /tmp/ucp-bench]

Prints one table: save and same-layout load on local disk (torch_ucp vs FileSystemWriter /
FileSystemReader with DCP's defaults and with 4 threads), and a resharded load (saved Shard(0)
over 4 ranks, loaded Shard(1) over 2 ranks) with bytes read per bytes needed. Every save is
durable when it returns (both systems fsync). The page cache is dropped before every load (as
root). For the resharded load it reports bytes *requested* per byte needed (stock: ``rchar``
of its read calls; torch_ucp: its reader's own count, since memory-mapped copies bypass read
calls) and bytes fetched *from disk* (``read_bytes``, both systems; on one host the page cache
serves a chunk file read by two ranks once). Loads are verified bit-exact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter  # noqa: E402
from torch_ucp.demo.launch import run_distributed  # noqa: E402

COLS = 4096


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


def _state(size_bytes: int, placement: Any, fill: bool) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return {
        name: distribute_tensor(
            _full(name, shape) if fill else torch.zeros(shape), mesh, [placement], src_data_rank=None
        )
        for name, shape in _tensors(size_bytes).items()
    }


def _timed(fn) -> float:
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
    if system.startswith("fsspec"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path, **options)
    return dcp.FileSystemReader(path)


def save_rank(system: str, path: str, size_bytes: int, dim: int, options: dict | None = None) -> dict[str, float]:
    state = _state(size_bytes, Shard(dim), fill=True)
    writer = _writer(system, path, options or {})
    planner = UCPSavePlanner() if system == "ucp" else None
    seconds = _timed(lambda: dcp.save(state, storage_writer=writer, planner=planner))
    return {"seconds": seconds}


def load_rank(system: str, path: str, size_bytes: int, dim: int, options: dict | None = None) -> dict[str, Any]:
    state = _state(size_bytes, Shard(dim), fill=False)
    before, before_calls = _bytes_read(), _rchar()
    reader = _reader(system, path, options or {})
    planner = UCPLoadPlanner() if system == "ucp" else None
    seconds = _timed(lambda: dcp.load(state, storage_reader=reader, planner=planner))
    read = _bytes_read() - before
    # requested: torch_ucp counts its range reads itself (memory-mapped copies bypass rchar)
    requested = reader.stats.bytes_read if system == "ucp" else _rchar() - before_calls
    needed = sum(t.to_local().numel() * 4 for t in state.values())
    ok = all(torch.equal(t.full_tensor(), _full(n, tuple(t.shape))) for n, t in state.items())
    return {"seconds": seconds, "read": read, "requested": requested, "needed": needed, "ok": ok}


def drop_caches() -> bool:
    """Evict the page cache (needs root) so every load reads from the disk, as after a restart.

    Without it stock DCP's loads would read its just-written files from memory while torch_ucp's
    writer evicts what it wrote (to keep large saves from filling the page cache)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _s3_rows(size: int, ws: int) -> list[tuple[str, str, float, float, str]]:
    from tests.support.fault_proxy import RETRY_STORAGE_OPTIONS
    from tests.support.s3 import S3Server

    total = sum(r * c * 4 for r, c in _tensors(size).values())
    rows = []
    with S3Server() as server:
        bucket = server.create_bucket()
        options = server.storage_options(**RETRY_STORAGE_OPTIONS)
        print(f"S3 (moto server on 127.0.0.1): {total / 2**30:.2f} GiB over {ws} ranks", flush=True)
        secs: dict[str, dict[str, float]] = {"save": {}, "load": {}}
        for system in ("fsspec", "ucp"):
            url = f"s3://{bucket}/{system}"
            res = run_distributed(save_rank, ws, system, url, size, 0, options)
            secs["save"][system] = max(r["seconds"] for r in res)
            res = run_distributed(load_rank, ws, system, url, size, 0, options)
            assert all(r["ok"] for r in res), f"{system}: S3 load mismatch"
            secs["load"][system] = max(r["seconds"] for r in res)
        for op in ("save", "load"):
            base = secs[op]["fsspec"]
            rows.append((f"S3 {op}", "fsspec", _gbps(total, base), 1.0, "FsspecWriter/Reader"))
            rows.append((f"S3 {op}", "torch_ucp", _gbps(total, secs[op]["ucp"]), base / secs[op]["ucp"],
                         "vs FsspecWriter/Reader"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dir", default="/tmp/torch-ucp-bench")
    p.add_argument("--s3-size-gib", type=float, default=0.25,
                   help="state size for the S3 rows (0 to skip); a local moto server is started")
    args = p.parse_args()
    size = int(args.size_gib * 2**30)
    total = sum(r * c * 4 for r, c in _tensors(size).values())
    ws = args.world_size
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    rows: list[tuple[str, str, float, float, str]] = []

    def path(name: str) -> str:
        return os.path.join(args.dir, name)

    print(f"state: {total / 2**30:.2f} GiB float32 over {ws} ranks, dir {args.dir}", flush=True)
    save_s = {}
    for system in ("dcp", "dcp-4t", "ucp"):
        res = run_distributed(save_rank, ws, system, path(f"same-{system}"), size, 0)
        save_s[system] = max(r["seconds"] for r in res)
    for system in ("dcp", "dcp-4t"):
        rows.append(("save", system, _gbps(total, save_s[system]), 1.0, ""))
    rows.append(("save", "torch_ucp", _gbps(total, save_s["ucp"]),
                 save_s["dcp"] / save_s["ucp"], f"{save_s['dcp-4t'] / save_s['ucp']:.2f}x vs dcp-4t"))

    load_s = {}
    for system in ("dcp", "dcp-4t", "ucp"):
        src = "dcp" if system != "ucp" else "ucp"
        cold = drop_caches()
        res = run_distributed(load_rank, ws, system, path(f"same-{src}"), size, 0)
        assert all(r["ok"] for r in res), f"{system}: same-layout load mismatch"
        load_s[system] = max(r["seconds"] for r in res)
    for system in ("dcp", "dcp-4t"):
        rows.append(("load same layout", system, _gbps(total, load_s[system]), 1.0, ""))
    rows.append(("load same layout", "torch_ucp", _gbps(total, load_s["ucp"]),
                 load_s["dcp"] / load_s["ucp"], ""))

    for system in ("dcp", "ucp"):
        run_distributed(save_rank, 4, system, path(f"reshard-{system}"), size, 0)
    reshard = {}
    for system in ("dcp", "ucp"):
        drop_caches()
        res = run_distributed(load_rank, 2, system, path(f"reshard-{system}"), size, 1)
        assert all(r["ok"] for r in res), f"{system}: resharded load mismatch"
        reshard[system] = (
            max(r["seconds"] for r in res),
            sum(r["requested"] for r in res),
            sum(r["read"] for r in res),
            sum(r["needed"] for r in res),
        )
    for system, label in (("dcp", "dcp"), ("ucp", "torch_ucp")):
        s, requested, read, needed = reshard[system]
        rows.append(("load Shard(0)x4 -> Shard(1)x2", label, _gbps(total, s), reshard["dcp"][0] / s,
                     f"requested/needed {requested / needed:.2f}, from disk {read / needed:.2f}"))

    if args.s3_size_gib > 0:
        rows.extend(_s3_rows(int(args.s3_size_gib * 2**30), ws))

    print()
    print("loads read from " + ("disk (page cache dropped before each)" if cold else "a warm page cache"))
    print(f"{'operation':<32} {'system':<10} {'GB/s':>7} {'vs dcp':>8}  notes")
    print("-" * 80)
    for op, system, gbps, ratio, note in rows:
        print(f"{op:<32} {system:<10} {gbps:>7.2f} {ratio:>7.2f}x  {note}")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
