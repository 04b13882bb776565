"""Staging a state dict into reusable host memory: :class:`StagingPool`.

An asynchronous save must copy the state out of the training tensors before training mutates
them; the copy is the only part of a save the caller waits for. Stock ``dcp.async_save`` deep
copies into freshly allocated memory every time: the caller pays for page faults on top of the
copy, and host memory is allocated and freed once per save (pytorch#170163,
Megatron-Bridge PR #359). A :class:`StagingPool` instead keeps one *arena* of host memory:

* The first save lays every tensor of the state out in the arena (64-byte aligned) and
  allocates it once: an anonymous ``mmap`` advised to use transparent huge pages, page-locked
  with ``cudaHostRegister`` when CUDA is available so device-to-host copies are true DMA.
* Later saves with the same shapes and dtypes (or any state that fits) reuse the arena: no
  allocation, no page faults, no growth. ``allocations`` counts arena allocations.
* CPU tensors are copied as raw bytes (:func:`copy_into`); CUDA tensors with
  ``copy_(non_blocking=True)`` on one side stream per device, ordered after the work queued on
  the caller's stream at the call, and one synchronisation of those streams at the end.
* DTensors are staged by copying their local tensor and rebuilding a DTensor with the same
  mesh, placements, global shape and stride (``DTensor.from_local(..., run_check=False)``), so
  the save planner still sees the layout. Non-tensor values are deep-copied.

**Staging in two halves.** :meth:`StagingPool.prepare` runs on the caller: it walks the state,
deep-copies non-tensor values, lays the tensors out in the arena and records each tensor's
version counter (and, for CUDA tensors, an event on the caller's current stream).
:meth:`StagingPool.copy` does the bulk copies and may run on another thread while training
runs forward and backward (``stage_before_step=`` in :func:`torch_ucp.async_save`).
Before and after copying a tensor it checks that its version counter did not move: an in-place
update that slipped in before the copy fails the save (:class:`StagingRaceError`) instead of
writing a torn checkpoint. This is a safety net, not a synchronisation: it sees changes made
through the state dict's tensors and their views (which share the counter), not through other
tensors over the same memory with their own counter (FSDP2's ``state_dict()`` builds such
tensors for its parameters), and a write racing with the copy only when its version bump lands
before the check after the copy.

**Bounded staging.** With ``max_bytes`` smaller than the state, only part of it fits. The pool
then fills the arena (at most ``max_bytes``) with the tensors that come *last* in the state
dict, which a writer reaches last, and leaves the others *streamed*: the staged state keeps a
reference to the live tensor and the background writer copies each of its fragments out when
it gets to it (see :mod:`torch_ucp.asynchronous.streaming`). The state counts as staged only once
every streamed fragment has been copied, and the caller waits for that (in the call, or with
``stage_before_step`` in the optimizer's next step): its blocked time becomes roughly "copy the
arena part + plan + write the streamed part", while host memory stays bounded by ``max_bytes``
plus the fragments the writer holds at once (one per writer thread for
:class:`torch_ucp.UCPWriter`), and nothing but the arena is kept from one save to the next.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import math
import mmap
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from torch_ucp.errors import CheckpointError
from torch_ucp.metadata.schema import ITEM_ALIGNMENT

logger = logging.getLogger(__name__)

# bytes: every staged tensor starts where the file's items do (a cache line, any dtype's alignment)
ALIGNMENT = ITEM_ALIGNMENT


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _poolable(t: torch.Tensor) -> bool:
    """Plain strided tensors of ordinary dtypes go to the arena; anything else is deep-copied.
    The type is checked first: subclasses such as ShardedTensor refuse the other attributes."""
    return (
        (type(t) is torch.Tensor or type(t) is torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_nested
        and t.device.type != "meta"
    )


class StagingRaceError(CheckpointError):
    """A tensor was modified in place after ``async_save`` returned and before it was staged."""


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class StagedLeaf:
    """One tensor of the state: where it comes from, where it goes in the arena."""

    __slots__ = ("path", "source", "local", "nbytes", "offset", "pooled", "version", "event")

    def __init__(self, path: str, source: torch.Tensor, local: torch.Tensor) -> None:
        self.path = path  # dotted position in the state dict, for error messages
        self.source = source  # the caller's tensor or DTensor
        self.local = local  # what gets copied: the tensor itself or the DTensor's local shard
        self.nbytes = _nbytes(local)
        self.offset = -1
        self.pooled = False
        self.version = _version(local)  # at the call
        self.event: Any = None  # CUDA: work queued on the caller's stream at the call

    def check_unmodified(self) -> None:
        """Raise :class:`StagingRaceError` if the tensor was modified in place since the call."""
        if self.version is not None and _version(self.local) != self.version:
            raise StagingRaceError(
                f"{self.path}: modified in place after async_save returned and before it was "
                "staged; pass the optimizer that updates it as stage_before_step=, or wait for "
                "handle.staged() before changing the state"
            )


@dataclass
class StagedState:
    """The outcome of :meth:`StagingPool.stage`.

    Attributes:
        state_dict: the staged state: same structure, tensors in the arena (or, for streamed
            tensors, the caller's live tensors), other values deep copies.
        pooled_bytes: bytes copied into the arena.
        streamed_bytes: bytes of tensors left live for the writer to copy (bounded staging).
        streamed: the live tensors/DTensors kept in ``state_dict``, by ``id()``.
        seconds: time spent staging.
        allocated: whether this call allocated (or re-allocated) the arena.
    """

    state_dict: dict[str, Any]
    pooled_bytes: int = 0
    streamed_bytes: int = 0
    streamed: dict[int, StagedLeaf] = field(default_factory=dict)
    seconds: float = 0.0
    allocated: bool = False


@dataclass
class PreparedState:
    """The caller's half of staging (:meth:`StagingPool.prepare`), input of
    :meth:`StagingPool.copy`."""

    template: Any
    leaves: list[StagedLeaf]
    allocated: bool
    seconds: float

    @property
    def streamed_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves if not leaf.pooled)


class StagingPool:
    """Reusable host memory for staging state dicts; see the module docstring.

    Not thread-safe: one thread stages at a time, and a staged state must not be in use (being
    written) when the next :meth:`stage` call reuses the arena; :class:`AsyncSaver` guarantees
    both by allowing one save in flight.

    Args:
        pin_memory: page-lock the arena for fast device-to-host copies. Default: whether CUDA
            is available.
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            logger.warning("torch_ucp: pin_memory needs CUDA; staging into pageable memory")
        self.pin_memory = cuda if pin_memory is None else bool(pin_memory) and cuda
        self.allocations = 0
        self._arena: torch.Tensor | None = None
        self._mmap: mmap.mmap | None = None
        self._pinned_ptr: int | None = None
        self._streams: dict[int, Any] = {}

    # -- memory -------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        """Size of the current arena (0 before the first save and after :meth:`close`)."""
        return 0 if self._arena is None else self._arena.numel()

    def _release_arena(self) -> None:
        if self._pinned_ptr is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            except Exception as e:  # noqa: BLE001 - releasing memory must not fail a save
                logger.warning("torch_ucp: unpinning the staging arena failed: %s", e)
            self._pinned_ptr = None
        self._arena = None
        self._mmap = None  # unmapped once no staged tensor refers to it

    def _allocate(self, nbytes: int) -> None:
        self._release_arena()
        nbytes = max(nbytes, ALIGNMENT)
        m = mmap.mmap(-1, nbytes)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # pragma: no cover - kernels without THP
                pass
        arena = torch.frombuffer(m, dtype=torch.uint8)
        if self.pin_memory:
            self._pin(arena)
        self._mmap, self._arena = m, arena
        self.allocations += 1
        logger.info(
            "torch_ucp: allocated a %.1f MiB staging arena%s (allocation %d)",
            nbytes / 2**20, " (pinned)" if self._pinned_ptr is not None else "", self.allocations,
        )

    def _pin(self, arena: torch.Tensor) -> None:  # pragma: no cover - needs CUDA
        ptr, size = arena.data_ptr(), arena.numel()
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))  # cudaHostRegisterPortable
        if err != 0:
            logger.warning(
                "torch_ucp: page-locking the %.1f MiB staging arena failed (cudaError %d); "
                "staging from CUDA will use pageable memory", size / 2**20, err,
            )
            return
        self._pinned_ptr = ptr

    def close(self) -> None:
        """Release the arena (and its page-locking). The pool can be used again afterwards."""
        self._release_arena()
        self._streams.clear()

    # -- staging ------------------------------------------------------------------------------
    def stage(self, state_dict: Mapping[str, Any], *, max_bytes: int | None = None) -> StagedState:
        """Copy ``state_dict`` into the arena and return the staged state
        (:meth:`prepare` then :meth:`copy`).

        ``state_dict`` is a nested structure of dicts, lists and tuples (``Stateful`` entries
        already replaced by their ``state_dict()``). With ``max_bytes`` set and the tensors
        larger than that, only a suffix of the tensors is staged and the rest is streamed
        (see the module docstring); the arena never exceeds ``max_bytes``.
        """
        return self.copy(self.prepare(state_dict, max_bytes=max_bytes))

    def prepare(self, state_dict: Mapping[str, Any], *, max_bytes: int | None = None) -> PreparedState:
        """The caller's half of staging: structure, deep copies of non-tensor values, arena
        layout (allocating it if needed), version counters and CUDA events. No bulk copy."""
        t0 = time.perf_counter()
        leaves: list[StagedLeaf] = []
        with torch.no_grad():
            template = _collect(state_dict, "", leaves, {})
        allocated = self._lay_out(leaves, max_bytes)
        if any(leaf.local.device.type == "cuda" for leaf in leaves):  # pragma: no cover - CUDA
            events: dict[torch.device, Any] = {}
            for leaf in leaves:
                if leaf.local.device.type == "cuda":
                    dev = leaf.local.device
                    if dev not in events:
                        events[dev] = torch.cuda.Event()
                        events[dev].record(torch.cuda.current_stream(dev))
                    leaf.event = events[dev]
        return PreparedState(template, leaves, allocated, time.perf_counter() - t0)

    def copy(self, prepared: PreparedState) -> StagedState:
        """The bulk half of staging: copy the pooled tensors into the arena (any thread).

        Raises :class:`StagingRaceError` if a tensor changed since :meth:`prepare`.
        """
        t0 = time.perf_counter()
        staged: dict[int, torch.Tensor] = {}
        streams: set[Any] = set()
        with torch.no_grad():
            for leaf in prepared.leaves:
                if leaf.pooled:
                    leaf.check_unmodified()
                    staged[id(leaf)] = self._copy_in(leaf, streams)
            for stream in streams:  # pragma: no cover - needs CUDA
                stream.synchronize()
            for leaf in prepared.leaves:  # a write that raced with its copy
                if leaf.pooled:
                    leaf.check_unmodified()
            out = _build(prepared.template, staged)
        streamed = [leaf for leaf in prepared.leaves if not leaf.pooled]
        return StagedState(
            state_dict=out,
            pooled_bytes=sum(leaf.nbytes for leaf in prepared.leaves if leaf.pooled),
            streamed_bytes=sum(leaf.nbytes for leaf in streamed),
            streamed={id(leaf.source): leaf for leaf in streamed},
            seconds=prepared.seconds + time.perf_counter() - t0,
            allocated=prepared.allocated,
        )

    def _lay_out(self, leaves: list[StagedLeaf], max_bytes: int | None) -> bool:
        """Choose which leaves go to the arena and where; (re-)allocate it if needed."""
        total = sum(_align(leaf.nbytes) for leaf in leaves)
        if max_bytes is not None and max_bytes > 0 and total > max_bytes:
            budget = max_bytes
            for leaf in reversed(leaves):  # the tail of the state is written last
                if _align(leaf.nbytes) <= budget:
                    leaf.pooled = True
                    budget -= _align(leaf.nbytes)
        else:
            for leaf in leaves:
                leaf.pooled = True
        offset = 0
        for leaf in leaves:
            if leaf.pooled:
                leaf.offset = offset
                offset += _align(leaf.nbytes)
        if offset == 0:
            return False
        too_big = max_bytes is not None and max_bytes > 0 and self.capacity_bytes > max_bytes
        if self._arena is None or self.capacity_bytes < offset or too_big:
            self._allocate(offset)
            return True
        return False

    def _copy_in(self, leaf: StagedLeaf, streams: set[Any]) -> torch.Tensor:
        assert self._arena is not None
        src = leaf.local
        buf = self._arena[leaf.offset : leaf.offset + leaf.nbytes].view(src.dtype).view(src.shape)
        if src.device.type == "cuda":  # pragma: no cover - needs CUDA
            stream = self._side_stream(src.device)
            stream.wait_event(leaf.event)  # after the work queued on the caller's stream
            with torch.cuda.stream(stream):
                buf.copy_(src.detach(), non_blocking=True)
            streams.add(stream)
        else:
            copy_into(buf, src)
        if isinstance(leaf.source, DTensor):
            return rebuild_dtensor(buf, leaf.source)
        return buf

    def _side_stream(self, device: torch.device) -> Any:  # pragma: no cover - needs CUDA
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream


def unpooled_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor in its own anonymous mapping, unmapped as soon as it is freed.

    For the short-lived copies of bounded staging: ``malloc`` would serve them from per-thread
    heaps that keep freed memory (glibc raises its mmap threshold after the first large free),
    so resident memory would creep up with every save.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


def _load_memcpy() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")  # releases the GIL
        fn = libc.memcpy
    except (OSError, AttributeError):  # pragma: no cover - no C library to load
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_void_p
    return fn


_MEMCPY = _load_memcpy()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a contiguous CPU ``dst`` of ``src``'s shape and dtype.

    Contiguous CPU sources are copied as raw bytes with the C library's ``memcpy`` (through
    ctypes, which releases the GIL): glibc switches to non-temporal stores for large copies
    and measured about 2x faster than ``Tensor.copy_`` or ``numpy.copyto`` on one thread, and
    ``Tensor.copy_`` with intra-op threads was 3-10x slower on a loaded machine.
    """
    src = src.detach()
    if (
        src.device.type == "cpu"
        and src.is_contiguous()
        and not (src.is_conj() or src.is_neg())
        and src.numel() > 0
        and dst.is_contiguous()
        and dst.shape == src.shape
        and dst.dtype == src.dtype
    ):
        nbytes = src.numel() * src.element_size()
        if _MEMCPY is not None:
            _MEMCPY(dst.data_ptr(), src.data_ptr(), nbytes)
        else:  # pragma: no cover
            np.copyto(dst.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    else:
        dst.copy_(src)


def rebuild_dtensor(local: torch.Tensor, like: DTensor) -> DTensor:
    """A DTensor with ``like``'s mesh, placements, global shape and stride over ``local``.

    ``DTensor.from_local`` moves a local tensor to the mesh's device type, which would copy a
    staged host buffer straight back to the GPU; for a mesh on another device type the DTensor
    is therefore built from ``like``'s spec directly, keeping ``local`` on the host (what DCP's
    own stager produces).
    """
    mesh = like.device_mesh
    if mesh.device_type == local.device.type:
        return DTensor.from_local(
            local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
    return DTensor(local, like._spec, requires_grad=False)


def _collect(obj: Any, path: str, leaves: list[StagedLeaf], by_id: dict[int, StagedLeaf]) -> Any:
    """The structure of ``obj`` with tensors replaced by :class:`StagedLeaf` placeholders (one per
    distinct tensor object) and every other leaf value deep-copied."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if isinstance(obj, DTensor) else obj
        if isinstance(obj, DTensor) or _poolable(obj):
            if not _poolable(local):
                return copy.deepcopy(obj)
            leaf = by_id.get(id(obj))
            if leaf is None:
                leaf = by_id[id(obj)] = StagedLeaf(path[:-1] or "<root>", obj, local)
                leaves.append(leaf)
            return leaf
        return copy.deepcopy(obj)  # ShardedTensor, quantized, sparse, nested ...
    if isinstance(obj, dict):
        return _same_mapping(
            obj, [(k, _collect(v, f"{path}{k}.", leaves, by_id)) for k, v in obj.items()]
        )
    if isinstance(obj, list):
        return [_collect(v, f"{path}{i}.", leaves, by_id) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(_collect(v, f"{path}{i}.", leaves, by_id) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


def _same_mapping(like: dict, items: list[tuple[Any, Any]]) -> dict:
    """``OrderedDict`` stays one; other dict subclasses become plain dicts (as DCP sees them)."""
    return OrderedDict(items) if isinstance(like, OrderedDict) else dict(items)


def _build(template: Any, staged: dict[int, torch.Tensor]) -> Any:
    if isinstance(template, StagedLeaf):
        return staged.get(id(template), template.source)  # streamed leaves stay live
    if isinstance(template, dict):
        return _same_mapping(template, [(k, _build(v, staged)) for k, v in template.items()])
    if isinstance(template, list):
        return [_build(v, staged) for v in template]
    if type(template) is tuple:
        return tuple(_build(v, staged) for v in template)
    return template
