"""Measurements shared by the benchmarks: the machine, the disk's ceiling, peak memory.

* :func:`machine_summary`: CPU count, RAM, torch version and the filesystem of a directory.
* :func:`disk_bandwidth`: sequential write and read bandwidth of a file in a directory,
  bypassing the page cache (``O_DIRECT``) where the filesystem allows it.
* :class:`PeakRSSIncrease`: the largest resident-memory increase of this process during a
  ``with`` block (``VmHWM`` reset through ``/proc/self/clear_refs``, else sampling).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from async_save_bench import PeakRSS, _malloc_trim, _rss

BLOCK = 16 << 20  # like ``dd bs=16M``


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


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------


def _ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def filesystem_of(directory: str) -> str:
    """``fstype (device) at mountpoint`` of the mount holding ``directory``."""
    path = os.path.realpath(directory)
    best = ("?", "?", "/")
    with open("/proc/self/mounts") as f:
        for line in f:
            source, target, fstype = line.split()[:3]
            target = target.replace("\\040", " ")
            inside = path == target or path.startswith(target.rstrip("/") + "/")
            if inside and len(target) >= len(best[2]):
                best = (fstype, source, target)
    return f"{best[0]} ({best[1]}) at {best[2]}"


def machine_summary(directory: str) -> str:
    return (f"machine: {os.cpu_count()} CPUs, {_ram_bytes() / 2**30:.1f} GiB RAM, "
            f"torch {torch.__version__}, --dir on {filesystem_of(directory)}")


# ---------------------------------------------------------------------------------------------
# the disk's ceiling
# ---------------------------------------------------------------------------------------------


@dataclass
class DiskBandwidth:
    """One sequential write and read of ``nbytes`` and how they were made."""

    nbytes: int
    write_seconds: float
    read_seconds: float
    write_direct: bool  # O_DIRECT (else buffered, then fsync)
    read_direct: bool  # O_DIRECT (else buffered, after dropping the page cache if possible)
    read_cold: bool = True

    @property
    def write_gbps(self) -> float:
        return self.nbytes / self.write_seconds / 1e9

    @property
    def read_gbps(self) -> float:
        return self.nbytes / self.read_seconds / 1e9

    def notes(self) -> tuple[str, str]:
        """How the write and the read were made, in words."""
        size = f"{self.nbytes / 2**30:.2f} GiB in 16 MiB blocks"
        write = size + (", fsync" if self.write_direct
                        else ": O_DIRECT refused, buffered write + fsync")
        read = size if self.read_direct else size + ": O_DIRECT refused, buffered read " + (
            "after drop_caches" if self.read_cold else "(page cache NOT dropped)")
        return write, read


def _aligned_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned buffer (``O_DIRECT`` needs aligned memory) of random bytes (so that a
    compressing or deduplicating virtual disk gets no shortcut)."""
    buf = mmap.mmap(-1, nbytes)
    buf.write(os.urandom(nbytes))
    return buf


def _open(path: str, flags: int, direct: bool) -> int:
    return os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)


def _transfer(op: Callable[[int, Any, int], int], fd: int, nbytes: int, threads: int) -> None:
    """Move ``nbytes`` in ``BLOCK``-sized ``op(fd, buffer, offset)`` calls, block ``i`` on
    thread ``i % threads``, one aligned buffer per thread."""

    def run(first: int) -> None:
        buf = _aligned_buffer(BLOCK)
        try:
            for offset in range(first * BLOCK, nbytes, threads * BLOCK):
                done = op(fd, buf, offset)
                if done != BLOCK:
                    raise OSError(f"short transfer at {offset}: {done} of {BLOCK} bytes")
        finally:
            buf.close()

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(run, t) for t in range(threads)]:
            f.result()


def _pread(fd: int, buf: mmap.mmap, offset: int) -> int:
    return os.preadv(fd, [buf], offset)


def _write_seconds(path: str, nbytes: int, threads: int, direct: bool) -> float:
    """Write ``nbytes`` and fsync."""
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct)
    try:
        t0 = time.perf_counter()
        _transfer(os.pwrite, fd, nbytes, threads)
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _read_seconds(path: str, nbytes: int, threads: int, direct: bool) -> float:
    """Read ``nbytes``."""
    fd = _open(path, os.O_RDONLY, direct)
    try:
        t0 = time.perf_counter()
        _transfer(_pread, fd, nbytes, threads)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _direct_refused(e: OSError) -> bool:
    """``O_DIRECT`` not supported by the filesystem (at open, or at the first transfer)."""
    return e.errno == errno.EINVAL


def disk_bandwidth(directory: str, nbytes: int, threads: int = 1) -> DiskBandwidth:
    """Sequential write (fsynced) then read of a ``nbytes`` file (rounded down to whole 16 MiB
    blocks) in ``directory``, in 16 MiB blocks from ``threads`` threads, with ``O_DIRECT``;
    where that is refused, buffered (the read after dropping the page cache). The file is
    removed."""
    nbytes = max(BLOCK, nbytes // BLOCK * BLOCK)
    path = os.path.join(directory, "disk-ceiling.bin")
    try:
        try:
            write_s, write_direct = _write_seconds(path, nbytes, threads, direct=True), True
        except OSError as e:
            if not _direct_refused(e):
                raise
            write_s, write_direct = _write_seconds(path, nbytes, threads, direct=False), False
        cold = True
        try:
            read_s, read_direct = _read_seconds(path, nbytes, threads, direct=True), True
        except OSError as e:
            if not _direct_refused(e):
                raise
            cold = drop_caches()
            read_s, read_direct = _read_seconds(path, nbytes, threads, direct=False), False
    finally:
        if os.path.exists(path):
            os.remove(path)
    return DiskBandwidth(nbytes, write_s, read_s, write_direct, read_direct, cold)


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``RssFile`` ...), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _rss_file() -> int:
    """Resident pages of files this process maps (``RssFile``: page cache, reclaimable)."""
    return status_bytes("RssFile")


class PeakRSSIncrease:
    """The largest resident-memory increase of this process during the block, in bytes
    (``increase``), over its RSS at entry (after ``malloc_trim``, so that memory freed earlier
    but kept by the allocator does not hide the block's allocations).

    Reads the kernel's high-water mark ``VmHWM`` after resetting it on entry; where that reset
    is not available, samples the RSS every 5 ms from a thread instead. ``mapped_increase``: the
    largest increase of the part that is pages of memory-mapped files (``RssFile``, sampled
    every 10 ms): page cache the kernel can reclaim; memory-mapped reads count in RSS,
    ``read()`` calls do not.
    """

    def __init__(self) -> None:
        self.increase = self.mapped_increase = 0
        self._baseline = self._mapped_baseline = 0
        self._total: PeakRSS | None = None
        self._mapped: PeakRSS | None = None

    def __enter__(self) -> PeakRSSIncrease:
        _malloc_trim()
        self._baseline, self._mapped_baseline = _rss(), _rss_file()
        self._mapped = PeakRSS(interval=0.01, read=_rss_file).__enter__()
        if not reset_peak_rss():
            self._total = PeakRSS(interval=0.005).__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mapped is not None
        self._mapped.__exit__(*exc)
        if self._total is not None:
            self._total.__exit__(*exc)
            peak = self._total.peak
        else:
            peak = status_bytes("VmHWM")
        self.increase = max(0, peak - self._baseline)
        self.mapped_increase = max(0, self._mapped.peak - self._mapped_baseline)
