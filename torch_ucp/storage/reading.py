"""The read engine: fill destination tensors with boxes of stored fragments.

Every box becomes a few byte ranges (:mod:`torch_ucp.storage.ranges`), optionally widened to
whole checksum blocks so they can be verified. Ranges of one data object are sorted, small
neighbours merged while the waste stays within budget, large ones split, and packed into tasks
that a thread pool runs in parallel. When the last range of a box arrives its checksum blocks
are verified and it is copied (with a dtype cast if needed) into the destination. A box that
is one exact contiguous range of the right dtype is read straight into the destination.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.metadata.schema import StoredBytes
from torch_ucp.storage.checksum import checksum_function
from torch_ucp.storage.ranges import block_aligned_bounds, c_strides, plan_box_ranges
from torch_ucp.storage.store import Store


@dataclass
class BoxRead:
    """Copy ``lengths`` elements at ``offsets`` of a stored fragment into ``dest``."""

    name: str
    data: StoredBytes
    dtype: torch.dtype
    fragment_offsets: tuple[int, ...]
    fragment_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    dest: torch.Tensor
    on_done: Callable[[torch.Tensor], None] | None = None


@dataclass
class ReadStats:
    """Bytes a reader fetched against the bytes its plan needed."""

    bytes_read: int = 0
    bytes_needed: int = 0
    requests: int = 0
    bytes_verified: int = 0

    def add(self, other: ReadStats) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_needed += other.bytes_needed
        self.requests += other.requests
        self.bytes_verified += other.bytes_verified


@dataclass
class _Job:
    read: BoxRead
    ranges: list[tuple[int, int]]  # fragment-relative (start, length), packed in order
    view_strides: tuple[int, ...]
    view_offset: int
    verify_whole: bool  # every block in the ranges is whole (block-aligned read)
    zero_copy: bool
    pending: int = 0
    buffer: torch.Tensor | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.ranges)

    def memory(self) -> memoryview:
        with self.lock:
            if self.buffer is None:
                if self.zero_copy:
                    self.buffer = self.read.dest.reshape(-1).view(torch.uint8)
                else:
                    self.buffer = torch.empty(self.total, dtype=torch.uint8)
            return memoryview(self.buffer.numpy())


@dataclass
class _Piece:
    job: _Job
    start: int  # absolute byte offset in the object
    length: int
    buffer_offset: int


class FragmentReader:
    """Reads boxes of fragments from one checkpoint with bounded read amplification.

    Args:
        store: the checkpoint's storage.
        verify: ``True`` verifies every checksum block a read covers whole, widening reads to
            whole blocks when that stays within the waste budget; ``"full"`` always widens (every
            byte loaded is verified); ``False`` skips verification.
        checksum_algorithm / block_bytes: as recorded in the metadata.
    """

    def __init__(
        self,
        store: Store,
        *,
        verify: bool | str = True,
        checksum_algorithm: str = "crc32",
        block_bytes: int = 1 << 20,
        threads: int | None = None,
        waste_ratio: float | None = None,
    ) -> None:
        self.store = store
        self.verify = verify
        self.block_bytes = block_bytes
        self.threads = threads or knobs.read_threads()
        self.waste_ratio = knobs.read_waste_ratio() if waste_ratio is None else waste_ratio
        self._checksum = checksum_function(checksum_algorithm) if verify else None
        self.stats = ReadStats()
        self._stats_lock = threading.Lock()

    # -- planning -----------------------------------------------------------------------------
    def _job(self, r: BoxRead) -> _Job:
        itemsize = r.dtype.itemsize
        frag_bytes = math.prod(r.fragment_shape) * itemsize
        if frag_bytes != r.data.byte_length:
            raise CorruptCheckpointError(
                f"{r.name}: metadata of fragment at {r.fragment_offsets} says "
                f"{r.data.byte_length} bytes in {self.store.describe(r.data.object)}, shape "
                f"{r.fragment_shape} of {r.dtype} needs {frag_bytes}"
            )
        needed = math.prod(r.lengths) * itemsize
        plan = plan_box_ranges(r.fragment_shape, r.offsets, r.lengths, itemsize, self.waste_ratio)
        if self.verify and r.data.checksums and needed:
            first = int(plan.starts[0])
            last = int(plan.starts[-1]) + plan.span
            lo, hi = block_aligned_bounds(first, last, self.block_bytes, frag_bytes)
            if self.verify == "full" or hi - lo <= (1.0 + self.waste_ratio) * needed:
                return _Job(
                    r,
                    [(lo, hi - lo)],
                    c_strides(r.fragment_shape),
                    (sum(o * s for o, s in zip(r.offsets, c_strides(r.fragment_shape)))
                     - lo // itemsize),
                    verify_whole=True,
                    zero_copy=False,
                )
        ranges = [(int(s), plan.span) for s in plan.starts]
        exact = len(ranges) == 1 and plan.span == needed
        zero_copy = (
            exact and r.dest.is_contiguous() and r.dest.dtype == r.dtype and r.dest.device.type == "cpu"
        )
        return _Job(r, ranges, plan.view_strides, plan.view_offset, False, zero_copy)

    def _tasks(self, jobs: list[_Job]) -> list[tuple[str, list[tuple[int, int]], list[list[_Piece]]]]:
        """Group pieces per object into merged ranges, then pack ranges into tasks."""
        by_object: dict[str, list[_Piece]] = {}
        for job in jobs:
            base = job.read.data.byte_offset
            buf_off = 0
            for start, length in job.ranges:
                by_object.setdefault(job.read.data.object, []).append(
                    _Piece(job, base + start, length, buf_off)
                )
                buf_off += length
            job.pending = len(job.ranges)
        max_gap = knobs.max_coalesce_gap_bytes()
        max_request = knobs.max_read_request_bytes()
        task_bytes = max(1 << 20, max_request // 4)
        tasks = []
        for obj, pieces in by_object.items():
            pieces.sort(key=lambda p: p.start)
            merged: list[tuple[int, int, list[_Piece]]] = []
            for p in pieces:
                if merged:
                    start, length, group = merged[-1]
                    end = start + length
                    gap = p.start - end
                    needed = sum(q.length for q in group) + p.length
                    if (
                        0 <= gap <= max_gap
                        and (length + gap + p.length) - needed <= self.waste_ratio * needed
                        and length + gap + p.length <= max_request
                    ):
                        merged[-1] = (start, p.start + p.length - start, [*group, p])
                        continue
                merged.append((p.start, p.length, [p]))
            # split ranges larger than max_request into parallel sub-reads of one piece
            cur_ranges: list[tuple[int, int]] = []
            cur_groups: list[list[_Piece]] = []
            cur_bytes = 0
            for start, length, group in merged:
                if len(group) == 1 and length > max_request:
                    p = group[0]
                    for off in range(0, length, max_request):
                        n = min(max_request, length - off)
                        sub = _Piece(p.job, p.start + off, n, p.buffer_offset + off)
                        tasks.append((obj, [(sub.start, n)], [[sub]]))
                    p.job.pending += math.ceil(length / max_request) - 1
                    continue
                cur_ranges.append((start, length))
                cur_groups.append(group)
                cur_bytes += length
                if cur_bytes >= task_bytes or len(cur_ranges) >= 4096:
                    tasks.append((obj, cur_ranges, cur_groups))
                    cur_ranges, cur_groups, cur_bytes = [], [], 0
            if cur_ranges:
                tasks.append((obj, cur_ranges, cur_groups))
        return tasks

    # -- execution ----------------------------------------------------------------------------
    def read(self, reads: Sequence[BoxRead]) -> ReadStats:
        """Fill every ``dest``; returns the statistics of this call (also added to ``stats``)."""
        local = ReadStats()
        jobs = []
        for r in reads:
            local.bytes_needed += math.prod(r.lengths) * r.dtype.itemsize
            job = self._job(r)
            if job.total == 0:
                if r.on_done is not None:
                    r.on_done(r.dest)
                continue
            jobs.append(job)
        tasks = self._tasks(jobs)
        local.requests = sum(len(ranges) for _, ranges, _ in tasks)
        local.bytes_read = sum(n for _, ranges, _ in tasks for _, n in ranges)
        done_lock = threading.Lock()

        def run(task: tuple[str, list[tuple[int, int]], list[list[_Piece]]]) -> None:
            obj, ranges, groups = task
            outs: list[memoryview] = []
            scratch: list[torch.Tensor | None] = []
            for (start, length), group in zip(ranges, groups):
                if len(group) == 1 and group[0].start == start and group[0].length == length:
                    p = group[0]
                    outs.append(p.job.memory()[p.buffer_offset : p.buffer_offset + length])
                    scratch.append(None)
                else:
                    tmp = torch.empty(length, dtype=torch.uint8)
                    outs.append(memoryview(tmp.numpy()))
                    scratch.append(tmp)
            self.store.read_into(obj, ranges, outs)
            finished = []
            for (start, _), group, tmp in zip(ranges, groups, scratch):
                for p in group:
                    if tmp is not None:
                        src = memoryview(tmp.numpy())[p.start - start : p.start - start + p.length]
                        p.job.memory()[p.buffer_offset : p.buffer_offset + p.length] = src
                    with done_lock:
                        p.job.pending -= 1
                        if p.job.pending == 0:
                            finished.append(p.job)
            for job in finished:
                self._finish(job, local)

        if len(tasks) <= 1 or self.threads <= 1:
            for t in tasks:
                run(t)
        else:
            with ThreadPoolExecutor(min(self.threads, len(tasks)), "ucp-read") as pool:
                for f in [pool.submit(run, t) for t in tasks]:
                    f.result()
        with self._stats_lock:
            self.stats.add(local)
        return local

    def _finish(self, job: _Job, stats: ReadStats) -> None:
        r = job.read
        if self._checksum is not None and r.data.checksums:
            verified = self._verify(job)
            with self._stats_lock:
                stats.bytes_verified += verified
        if not job.zero_copy:
            assert job.buffer is not None
            src = job.buffer.view(r.dtype).as_strided(r.lengths, job.view_strides, job.view_offset)
            r.dest.copy_(src)
        job.buffer = None
        if r.on_done is not None:
            r.on_done(r.dest)

    def _verify(self, job: _Job) -> int:
        r = job.read
        block = self.block_bytes
        frag_end = r.data.byte_length
        mem = job.memory()
        verified = 0
        buf_off = 0
        for start, length in job.ranges:
            end = start + length
            b = -(-start // block)
            while True:
                lo = b * block
                hi = min(lo + block, frag_end)
                if hi > end or lo >= frag_end:
                    break
                got = self._checksum(mem[buf_off + lo - start : buf_off + hi - start])
                if got != r.data.checksums[b]:
                    obj = self.store.describe(r.data.object)
                    a = r.data.byte_offset + lo
                    raise CorruptCheckpointError(
                        f"checksum mismatch in tensor {r.name!r} (fragment at offsets "
                        f"{list(r.fragment_offsets)}): data object {obj} bytes [{a}, "
                        f"{r.data.byte_offset + hi}) have checksum {got:#010x}, metadata says "
                        f"{r.data.checksums[b]:#010x}"
                    )
                verified += hi - lo
                b += 1
            buf_off += length
        return verified
