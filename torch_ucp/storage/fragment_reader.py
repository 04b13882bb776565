"""The read engine: fill destination tensors with boxes of stored fragments.

Every box is first widened to the checksum blocks around it (:class:`~torch_ucp.metadata.
checksums.BlockGrid`: blocks are small in both directions, so a column range of a fragment widens
to a column range of blocks, not to whole rows), then becomes a few byte ranges
(:mod:`torch_ucp.storage.ranges`). Ranges of one data object are sorted, small neighbours merged
while the waste stays within budget, large ones split, and packed into tasks that a thread pool
runs in parallel. When the last range of a box arrives the blocks it covers are verified and the
box is copied (with a dtype cast if needed) into the destination, so every byte delivered was
verified; ``verify=False`` is the only way to skip it. A box that is one exact contiguous range
of the right dtype is read straight into the destination (and verified there).
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from torch_ucp import knobs
from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.metadata.checksums import BlockGrid, checksum_function
from torch_ucp.metadata.schema import (
    DEFAULT_CHECKSUM,
    V1_CHECKSUM_BLOCK_BYTES,
    CheckpointMetadata,
    StoredBytes,
)
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


def normalize_verify(verify: bool | str) -> bool:
    """``verify=`` as a bool. ``"full"`` (the old name of what is now the default) is accepted
    with a ``DeprecationWarning``."""
    if isinstance(verify, bool):
        return verify
    if verify == "full":
        warnings.warn(
            'verify="full" is the default now (every byte read is verified); pass verify=True',
            DeprecationWarning,
            stacklevel=3,
        )
        return True
    raise TypeError(f"verify must be True or False, got {verify!r}")


@dataclass(frozen=True)
class _Blocks:
    """The checksum blocks a job verifies: ``grid`` blocks ``mats x bands x pieces``, with row
    ``r`` of matrix ``m`` at byte ``row_at(m, r)`` of the job's buffer (``row_at`` gives where the
    row's byte 0 would be; only the blocks' bytes are touched)."""

    grid: BlockGrid
    mats: Sequence[int]
    bands: range
    pieces: range
    row_at: Callable[[int, int], int]

    @property
    def nbytes(self) -> int:
        g = self.grid
        rows = min(self.bands.stop * g.band, g.rows) - self.bands.start * g.band
        cols = min(self.pieces.stop * g.width, g.row_bytes) - self.pieces.start * g.width
        return len(self.mats) * rows * cols


@dataclass
class _Job:
    read: BoxRead
    ranges: list[tuple[int, int]]  # fragment-relative (start, length), packed in order
    view_strides: tuple[int, ...]
    view_offset: int
    zero_copy: bool
    blocks: _Blocks | None = None  # verified when the job's bytes are in
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


def _widen(start: int, length: int, unit: int, limit: int) -> tuple[int, int]:
    """``[start, start + length)`` widened to multiples of ``unit``, clipped at ``limit``
    (``unit=0``: the whole ``[0, limit)``)."""
    if unit <= 0:
        return 0, limit
    return start - start % unit, min(-(-(start + length) // unit) * unit, limit)


@dataclass
class _Piece:
    job: _Job
    start: int  # absolute byte offset in the object
    length: int
    buffer_offset: int


@dataclass
class _Task:
    """Reads run by one thread: pieces of one job, or one merged read of small jobs."""

    object: str
    pieces: list[_Piece]
    merged: bool = False

    @property
    def nbytes(self) -> int:
        if self.merged:
            return self.pieces[-1].start + self.pieces[-1].length - self.pieces[0].start
        return sum(p.length for p in self.pieces)


class _ObjectMaps:
    """Copy-on-write memory maps of local data objects, opened once per read call."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, obj: str, name: str, needed_end: int) -> torch.Tensor:
        with self._lock:
            hit = self._maps.get(obj)
            if hit is None:
                try:
                    fd = self.store.open_local(obj)  # a regular file inside the checkpoint
                except FileNotFoundError:
                    raise CorruptCheckpointError(
                        f"cannot read tensor {name!r}: data object {self.store.describe(obj)} is missing"
                    ) from None
                try:
                    size = os.fstat(fd).st_size
                    # ACCESS_COPY: a writable private view (torch wants writable buffers);
                    # nothing is ever written, so nothing is copied
                    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else None
                finally:
                    os.close(fd)
                data = torch.frombuffer(mm, dtype=torch.uint8) if mm is not None else torch.empty(0, dtype=torch.uint8)
                hit = self._maps[obj] = (mm, data)
            data = hit[1]
        if needed_end > len(data):  # reading past the end of a mapping would SIGBUS
            raise CorruptCheckpointError(
                f"cannot read tensor {name!r}: data object {self.store.describe(obj)} is truncated: "
                f"needed bytes up to {needed_end} but it has {len(data)}"
            )
        return data

    def release(self, obj: str, start: int, end: int) -> None:
        """Drop the mapped pages of bytes ``start:end`` from this process's resident memory once
        copied out (each fragment is read once; a page shared with a neighbour is simply read
        again from the page cache if needed: nothing was written to it)."""
        mm = self._maps[obj][0]
        if mm is None or not hasattr(mm, "madvise"):
            return
        start -= start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(mm)) - start)

    def close(self) -> None:
        self._maps.clear()  # the mappings close when the last tensor view is gone


class FragmentReader:
    """Reads boxes of fragments from one checkpoint with bounded read amplification.

    Args:
        store: the checkpoint's storage.
        verify: ``True`` (default) widens every read to the checksum blocks around it and
            verifies them before a byte is delivered; ``False`` skips verification.
        checksum_algorithm / block_bytes / block_width: as recorded in the metadata
            (``block_width=None``: version-1 flat blocks).
    """

    def __init__(
        self,
        store: Store,
        *,
        verify: bool | str = True,
        checksum_algorithm: str = DEFAULT_CHECKSUM,
        block_bytes: int = V1_CHECKSUM_BLOCK_BYTES,
        block_width: int | None = None,
        threads: int | None = None,
        waste_ratio: float | None = None,
    ) -> None:
        self.store = store
        self.verify = normalize_verify(verify)
        if type(block_bytes) is not int or block_bytes < 1 or (
            block_width is not None and (type(block_width) is not int or block_width < 1)
        ):
            raise CorruptCheckpointError(
                f"{store.url}: checksum blocks of {block_bytes!r} bytes, width {block_width!r}: "
                "expected positive integers"
            )
        self.block_bytes = block_bytes
        self.block_width = block_width
        self.threads = threads or knobs.read_threads()
        self.waste_ratio = knobs.read_waste_ratio() if waste_ratio is None else waste_ratio
        self._checksum = checksum_function(checksum_algorithm) if self.verify else None
        self.stats = ReadStats()
        self._stats_lock = threading.Lock()

    @classmethod
    def for_checkpoint(
        cls, store: Store, meta: CheckpointMetadata, *, verify: bool | str = True, threads: int | None = None
    ) -> FragmentReader:
        """A reader of the checkpoint ``meta`` describes, verifying with its checksum blocks."""
        return cls(
            store,
            verify=verify,
            checksum_algorithm=meta.checksum_algorithm,
            block_bytes=meta.checksum_block_bytes,
            block_width=meta.checksum_block_width,
            threads=threads,
        )

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
        contiguous_dest = (
            r.dest.is_contiguous() and r.dest.dtype == r.dtype and r.dest.device.type == "cpu"
        )
        if tuple(r.lengths) == tuple(r.fragment_shape) and needed:  # the whole fragment
            strides = c_strides(r.fragment_shape)
            blocks = None
            if self.verify:
                grid = self._grid(r)
                blocks = _Blocks(grid, range(grid.mats), range(grid.bands), range(grid.pieces),
                                 lambda m, row: (m * grid.rows + row) * grid.row_bytes)
            return _Job(r, [(0, frag_bytes)], strides, 0, contiguous_dest, blocks)
        if self.verify and needed:
            return self._verified_job(r, frag_bytes, needed, contiguous_dest)
        plan = plan_box_ranges(r.fragment_shape, r.offsets, r.lengths, itemsize, self.waste_ratio)
        ranges = [(int(s), plan.span) for s in plan.starts]
        exact = len(ranges) == 1 and plan.span == needed
        return _Job(r, ranges, plan.view_strides, plan.view_offset, exact and contiguous_dest)

    def _grid(self, r: BoxRead) -> BlockGrid:
        """The fragment's checksum blocks, checked against the checksums its metadata lists."""
        grid = BlockGrid.for_fragment(r.fragment_shape, r.dtype.itemsize, self.block_bytes, self.block_width)
        have = len(r.data.checksums)
        if have != grid.count:
            where = f"tensor {r.name!r} (fragment at offsets {list(r.fragment_offsets)})"
            if have == 0:
                raise CorruptCheckpointError(
                    f"{where}: the metadata records no checksums for its "
                    f"{r.data.byte_length} bytes in {self.store.describe(r.data.object)}; every "
                    "byte read is verified by default: load with verify=False to read it unverified"
                )
            raise CorruptCheckpointError(
                f"{where}: the metadata lists {have} checksums, its block layout needs "
                f"{grid.count} ({self.store.describe(r.data.object)})"
            )
        return grid

    def _verified_job(self, r: BoxRead, frag_bytes: int, needed: int, contiguous_dest: bool) -> _Job:
        """A job reading the box widened to the checksum blocks around it."""
        grid = self._grid(r)
        itemsize = r.dtype.itemsize
        strides = c_strides(r.fragment_shape)
        box_start = sum(o * s for o, s in zip(r.offsets, strides))
        if grid.is_flat:  # version 1 and 1-D fragments: one byte range of whole blocks
            plan = plan_box_ranges(r.fragment_shape, r.offsets, r.lengths, itemsize, 0.0)
            first, last = int(plan.starts[0]), int(plan.starts[-1]) + plan.span
            lo, hi = block_aligned_bounds(first, last, grid.width, frag_bytes)
            start = lo - lo % itemsize  # the buffer starts on an element
            blocks = _Blocks(grid, [0], range(1), range(lo // grid.width, -(-hi // grid.width)),
                             lambda m, row: -start)
            return _Job(r, [(start, hi - start)], strides, box_start - start // itemsize,
                        zero_copy=contiguous_dest and hi - start == needed and start == first,
                        blocks=blocks)
        offsets, lengths = list(r.offsets), list(r.lengths)
        elems = grid.width // itemsize  # row elements per block (width is whole elements)
        if grid.width % itemsize or (grid.width < grid.row_bytes and not elems):
            raise CorruptCheckpointError(
                f"tensor {r.name!r}: checksum block width {grid.width} is not a whole number of "
                f"{r.dtype} elements"
            )
        cols = _widen(offsets[-1], lengths[-1], elems, r.fragment_shape[-1])
        rows = _widen(offsets[-2], lengths[-2], grid.band, r.fragment_shape[-2])
        w_off = offsets[:-2] + [rows[0], cols[0]]
        w_len = lengths[:-2] + [rows[1] - rows[0], cols[1] - cols[0]]
        plan = plan_box_ranges(r.fragment_shape, w_off, w_len, itemsize, self.waste_ratio)
        view_offset = plan.view_offset + sum(
            (o - w) * s for o, w, s in zip(offsets, w_off, plan.view_strides)
        )
        ranges = [(int(s), plan.span) for s in plan.starts]
        whole = w_off == list(r.offsets) and w_len == list(r.lengths) and len(ranges) == 1
        exact = whole and plan.span == needed
        lead_shape = r.fragment_shape[:-2]
        lead_strides = c_strides(lead_shape)
        buffer_rows: dict[int, int] = {}  # matrix -> its element offset in the buffer
        for lead in itertools.product(*(range(o, o + n) for o, n in zip(w_off[:-2], w_len[:-2]))):
            m = sum(i * s for i, s in zip(lead, lead_strides))
            buffer_rows[m] = plan.view_offset + sum(
                (i - o) * s for i, o, s in zip(lead, w_off, plan.view_strides)
            )
        row_stride = plan.view_strides[-2]
        col0 = cols[0] * itemsize

        def row_at(m: int, row: int) -> int:
            return (buffer_rows[m] + (row - rows[0]) * row_stride) * itemsize - col0

        blocks = _Blocks(
            grid,
            list(buffer_rows),
            range(rows[0] // grid.band, -(-rows[1] // grid.band)),
            range(cols[0] // elems if elems else 0, -(-cols[1] // elems) if elems else 1),
            row_at,
        )
        return _Job(r, ranges, plan.view_strides, view_offset, exact and contiguous_dest, blocks)

    def _tasks(self, jobs: list[_Job]) -> list[_Task]:
        """Pack the jobs' ranges into read tasks.

        A job with several ranges or a large range is read on its own, its ranges split into
        tasks of at most ``max_read_request`` bytes. Small single-range jobs of one data object
        (many small tensors) are sorted and neighbours merged into one request while the bytes
        in between stay within the waste budget.
        """
        max_gap = knobs.max_coalesce_gap_bytes()
        max_request = knobs.max_read_request_bytes()
        coalesce_limit = knobs.coalesce_limit_bytes()
        tasks: list[_Task] = []
        small: dict[str, list[_Piece]] = {}
        for job in jobs:
            obj, base = job.read.data.object, job.read.data.byte_offset
            if len(job.ranges) == 1 and job.total < coalesce_limit:
                small.setdefault(obj, []).append(_Piece(job, base + job.ranges[0][0], job.total, 0))
                job.pending = 1
                continue
            pieces: list[_Piece] = []
            task_bytes = 0
            buf_off = 0
            first_task = len(tasks)
            for start, length in job.ranges:
                for off in range(0, length, max_request):
                    n = min(max_request, length - off)
                    if pieces and task_bytes + n > max_request:
                        tasks.append(_Task(obj, pieces))
                        pieces, task_bytes = [], 0
                    pieces.append(_Piece(job, base + start + off, n, buf_off + off))
                    task_bytes += n
                buf_off += length
            tasks.append(_Task(obj, pieces))
            job.pending = len(tasks) - first_task
        for obj, pieces in small.items():
            pieces.sort(key=lambda p: p.start)
            group: list[_Piece] = []
            group_bytes = 0  # sum of the group's lengths, kept as it grows (no re-summing)
            for p in pieces:
                if group:
                    start = group[0].start
                    end = group[-1].start + group[-1].length
                    needed = group_bytes + p.length
                    merged = p.start + p.length - start
                    if (
                        0 <= p.start - end <= max_gap
                        and merged <= coalesce_limit
                        and merged - needed <= self.waste_ratio * needed
                    ):
                        group.append(p)
                        group_bytes = needed
                        continue
                    tasks.append(_Task(obj, group, merged=len(group) > 1))
                group, group_bytes = [p], p.length
            if group:
                tasks.append(_Task(obj, group, merged=len(group) > 1))
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
        mapped_jobs = [j for j in jobs if self._mappable(j)]
        jobs = [j for j in jobs if not self._mappable(j)]
        tasks: list[Any] = self._tasks(jobs)
        local.requests = sum(1 if t.merged else len(t.pieces) for t in tasks)
        local.requests += sum(len(j.ranges) for j in mapped_jobs)
        local.bytes_read = sum(t.nbytes for t in tasks) + sum(j.total for j in mapped_jobs)
        done_lock = threading.Lock()
        maps = _ObjectMaps(self.store)
        tasks.extend(mapped_jobs)

        def run(task: _Task | _Job) -> None:
            if isinstance(task, _Job):
                self._read_mapped(task, maps, local)
                return
            pieces = task.pieces
            if task.merged:
                start = pieces[0].start
                scratch = torch.empty(task.nbytes, dtype=torch.uint8)
                view = memoryview(scratch.numpy())
                self._read_into(task, [(start, task.nbytes)], [view])
                for p in pieces:
                    p.job.memory()[p.buffer_offset : p.buffer_offset + p.length] = view[
                        p.start - start : p.start - start + p.length
                    ]
            else:
                mem = pieces[0].job.memory()
                self._read_into(
                    task,
                    [(p.start, p.length) for p in pieces],
                    [mem[p.buffer_offset : p.buffer_offset + p.length] for p in pieces],
                )
            finished = []
            with done_lock:
                for job in {id(p.job): p.job for p in pieces}.values():
                    job.pending -= 1
                    if job.pending == 0:
                        finished.append(job)
            for job in finished:
                self._finish(job, local)

        try:
            if len(tasks) <= 1 or self.threads <= 1:
                for t in tasks:
                    run(t)
            else:
                with ThreadPoolExecutor(min(self.threads, len(tasks)), "ucp-read") as pool:
                    for f in [pool.submit(run, t) for t in tasks]:
                        f.result()
        finally:
            maps.close()
        with self._stats_lock:
            self.stats.add(local)
        return local

    def _read_into(
        self, task: _Task, ranges: list[tuple[int, int]], outs: list[memoryview]
    ) -> None:
        try:
            self.store.read_into(task.object, ranges, outs)
        except CorruptCheckpointError as e:  # name the tensors, not just the object
            names = sorted({p.job.read.name for p in task.pieces})
            shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
            raise CorruptCheckpointError(f"cannot read tensor {shown}: {e}") from e

    def _finish(self, job: _Job, stats: ReadStats) -> None:
        r = job.read
        if job.blocks is not None:
            self._verify(job, job.memory(), job.blocks.row_at, stats)
        if not job.zero_copy:
            assert job.buffer is not None
            src = job.buffer.view(r.dtype).as_strided(r.lengths, job.view_strides, job.view_offset)
            r.dest.copy_(src)
        job.buffer = None
        if r.on_done is not None:
            r.on_done(r.dest)

    def _verify(
        self, job: _Job, mem: memoryview, row_at: Callable[[int, int], int], stats: ReadStats
    ) -> None:
        """Verify the job's checksum blocks, read from ``mem`` at ``row_at``."""
        blocks = job.blocks
        assert blocks is not None and self._checksum is not None
        grid, r = blocks.grid, job.read
        got = grid.verify_blocks(mem, row_at, self._checksum, blocks.mats, blocks.bands, blocks.pieces)
        k = 0
        for m in blocks.mats:
            for i in blocks.bands:
                for j in blocks.pieces:
                    index = grid.index(m, i, j)
                    if got[k] != r.data.checksums[index]:
                        raise self._mismatch(r, grid, m, i, j, got[k])
                    k += 1
        with self._stats_lock:
            stats.bytes_verified += blocks.nbytes

    def _mismatch(self, r: BoxRead, grid: BlockGrid, m: int, i: int, j: int, got: int) -> CorruptCheckpointError:
        obj = self.store.describe(r.data.object)
        expected = r.data.checksums[grid.index(m, i, j)]
        row0 = (m * grid.rows + i * grid.band) * grid.row_bytes
        a = r.data.byte_offset + row0 + j * grid.width
        width = min(grid.width, grid.row_bytes - j * grid.width)
        rows = min(grid.band, grid.rows - i * grid.band)
        b = a + (rows - 1) * grid.row_bytes + width
        where = f"bytes [{a}, {b})"
        if rows > 1 and width < grid.row_bytes:
            where = f"block {grid.index(m, i, j)} ({rows} rows of {width} bytes, every {grid.row_bytes}) in {where}"
        return CorruptCheckpointError(
            f"checksum mismatch in tensor {r.name!r} (fragment at offsets "
            f"{list(r.fragment_offsets)}): data object {obj} {where} has checksum "
            f"{got:#010x}, metadata says {expected:#010x}"
        )

    # -- local files: memory-mapped strided copies ----------------------------------------------
    def _mappable(self, job: _Job) -> bool:
        """Many small ranges of a local file: copy them straight out of a memory map (one
        strided copy instead of a syscall per range). Needs element-aligned fragments."""
        return (
            self.store.posix
            and len(job.ranges) > 1
            and job.read.data.byte_offset % job.read.dtype.itemsize == 0
        )

    def _read_mapped(self, job: _Job, maps: _ObjectMaps, stats: ReadStats) -> None:
        r = job.read
        mapped = maps.get(r.data.object, r.name, r.data.byte_offset + r.data.byte_length)
        if job.blocks is not None:
            grid, base = job.blocks.grid, r.data.byte_offset
            self._verify(job, memoryview(mapped.numpy()),
                         lambda m, row: base + (m * grid.rows + row) * grid.row_bytes, stats)
        itemsize = r.dtype.itemsize
        strides = c_strides(r.fragment_shape)
        first = (r.data.byte_offset // itemsize) + sum(
            o * st for o, st in zip(r.offsets, strides)
        )
        elements = mapped[: len(mapped) - len(mapped) % itemsize].view(r.dtype)
        r.dest.copy_(elements.as_strided(r.lengths, strides, first))
        maps.release(r.data.object, r.data.byte_offset, r.data.byte_offset + r.data.byte_length)
        if r.on_done is not None:
            r.on_done(r.dest)
