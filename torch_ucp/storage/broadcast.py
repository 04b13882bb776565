"""Deliver bytes one rank read to the other ranks that need them.

A *transfer* is one message of a share set (:mod:`torch_ucp.storage.sharing`): its reader fills
a buffer from storage and sends it down a tree of the set's members; each member receives it
from its parent, forwards it to its children and copies it into its own tensors. The transfers
of a rank run in one global order that every rank agrees on, through point-to-point sends on
the checkpoint's process group (gloo for CPU buffers, NCCL for CUDA ones):

- **Overlap.** Reads run ahead in a thread pool while earlier messages are still on the wire,
  and receives are posted ahead, within a bound on the bytes of buffers alive
  (``TORCH_UCP_SHARE_INFLIGHT_BYTES``; one message more when nothing else can free memory).
- **No deadlock.** Communication is issued in the global order on every rank (NCCL matches a
  pair's operations in issue order; gloo also gets a distinct tag per message of a pair), and
  the oldest message not yet issued may always take a buffer when no issued message is still
  open. Then the oldest unfinished message of the whole job is issued by all its members and
  completes: by induction, every message does.
- **Failures reach everyone, in step.** Each message ends in a 256-byte trailer: a status, the
  crc32c of the payload and, after a failure, the reader's error text. A reader whose read
  fails still sends the message, marked failed; receivers forward it unchanged. Every rank runs
  its whole schedule (after a failure it reads nothing more and sends failure markers), then
  raises the first error, which names the rank that failed and the tensors and data objects.
  Receivers check the crc32c of every message they receive from CPU buffers: the reader
  verified the stored checksums of what it read, the receiver that the transfer delivered it.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from torch_ucp.errors import SharedReadError
from torch_ucp.metadata.checksums import crc32c

TRAILER = 256
_HEAD = struct.Struct("<IIIII")  # magic, status, crc32c of the payload, source rank, text bytes
_MAGIC = 0x53504355  # "UCPS"
_OK, _FAILED = 0, 1
_TEXT = TRAILER - _HEAD.size


@dataclass
class Transfer:
    """One message from this rank's point of view.

    Attributes:
        order: its position in the load's global message order.
        nbytes: payload bytes.
        source: global rank of its reader.
        parent: the rank this rank receives it from (``None``: this rank reads it).
        children: ranks this rank sends it to.
        recv_tag / send_tags: point-to-point tags (per directed pair, in global order).
        what: names the tensors and data objects it carries (for errors; called lazily).
        handle: the caller's message.
    """

    order: tuple[int, ...]
    nbytes: int
    source: int
    parent: int | None
    children: tuple[int, ...]
    recv_tag: int
    send_tags: tuple[int, ...]
    what: Callable[[], str]
    handle: Any = None


@dataclass
class TransferStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0


@dataclass
class _State:
    t: Transfer
    buffer: torch.Tensor | None = None
    read_done: bool = False
    recv_done: bool = False
    issued: bool = False
    sends_left: int = 0
    finished: bool = False
    failed: bool = False

    @property
    def size(self) -> int:
        return self.t.nbytes + TRAILER


class TransferEngine:
    """Runs a rank's transfers (see the module docstring).

    Args:
        group: the checkpoint's process group (``None``: the default group).
        rank: this rank's global rank.
        device: where message buffers live (``cpu`` for gloo, ``cuda`` for NCCL).
        inflight_bytes: bound on the bytes of message buffers alive at once.
        read_workers: reads running at once (each a :class:`FragmentReader` call).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        rank: int,
        device: torch.device,
        inflight_bytes: int,
        read_workers: int,
    ) -> None:
        self.group = group
        self.rank = rank
        self.device = device
        self.inflight_bytes = inflight_bytes
        self.read_workers = max(1, read_workers)
        self.stats = TransferStats()
        self._error: BaseException | None = None
        self._error_text = ""
        self._lock = threading.Lock()

    # -- the trailer ---------------------------------------------------------------------------
    def _seal(self, st: _State, host: torch.Tensor, failure: str | None) -> None:
        """Write the trailer of a message this rank read."""
        payload = memoryview(host.numpy())[: st.t.nbytes]
        text = (failure or "").encode("utf-8", "replace")[:_TEXT]
        crc = crc32c(payload) if failure is None else 0
        head = _HEAD.pack(_MAGIC, _FAILED if failure else _OK, crc, self.rank, len(text))
        trailer = host[st.t.nbytes :].numpy()
        trailer[:] = 0
        trailer[: _HEAD.size] = memoryview(head)
        trailer[_HEAD.size : _HEAD.size + len(text)] = memoryview(text)

    def _unseal(self, st: _State) -> str | None:
        """Check a received message's trailer (and crc32c of CPU payloads): ``None`` if good,
        else the reason."""
        assert st.buffer is not None
        trailer = st.buffer[st.t.nbytes :].cpu().numpy().tobytes()
        magic, status, crc, source, n = _HEAD.unpack_from(trailer)
        if magic != _MAGIC:
            return f"the message from rank {st.t.parent} has no valid trailer (a transfer of the wrong size?)"
        if status != _OK:
            return trailer[_HEAD.size : _HEAD.size + min(n, _TEXT)].decode("utf-8", "replace")
        if st.buffer.device.type == "cpu":
            got = crc32c(memoryview(st.buffer.numpy())[: st.t.nbytes])
            if got != crc:
                return (f"the {st.t.nbytes} bytes received from rank {st.t.parent} have crc32c "
                        f"{got:08x}, rank {source} sent {crc:08x} (damaged in transfer)")
        return None

    # -- errors --------------------------------------------------------------------------------
    def _fail(self, error: BaseException, text: str) -> None:
        with self._lock:
            if self._error is None:
                self._error, self._error_text = error, text

    # -- the loop ------------------------------------------------------------------------------
    def run(
        self,
        transfers: Sequence[Transfer],
        read: Callable[[Transfer, torch.Tensor], None],
        deliver: Callable[[Transfer, torch.Tensor], None],
    ) -> TransferStats:
        """Run ``transfers`` (in their global order). ``read(t, host_buffer)`` fills the payload
        of a message this rank reads (in a worker thread); ``deliver(t, payload)`` copies a
        good payload into this rank's tensors (in the calling thread). Raises the first error
        once the whole schedule has run."""
        states = [_State(t) for t in sorted(transfers, key=lambda t: t.order)]
        events: queue.SimpleQueue = queue.SimpleQueue()
        n = len(states)
        inflight = 0
        open_issued = 0
        next_read = next_issue = finished = 0
        readers = ThreadPoolExecutor(self.read_workers, "ucp-share-read")
        waiters = ThreadPoolExecutor(256, "ucp-share-wait")

        def alloc(st: _State, forced: bool) -> bool:
            nonlocal inflight
            if not forced and inflight and inflight + st.size > self.inflight_bytes:
                return False
            st.buffer = torch.empty(st.size, dtype=torch.uint8, device=self.device)
            inflight += st.size
            return True

        def submit_read(st: _State) -> None:
            poisoned = self._error is not None
            fut = readers.submit(self._read_one, st, read, poisoned)
            fut.add_done_callback(lambda f, st=st: events.put(("read", st, f)))

        def watch(kind: str, st: _State, work: Any) -> None:
            fut = waiters.submit(work.wait)
            fut.add_done_callback(lambda f, st=st: events.put((kind, st, f)))

        def post_sends(st: _State) -> None:
            assert st.buffer is not None
            st.sends_left = len(st.t.children)
            for child, tag in zip(st.t.children, st.t.send_tags):
                watch("send", st, dist.isend(st.buffer, child, group=self.group, tag=tag))
                self.stats.bytes_sent += st.size

        try:
            while finished < n:
                # reads ahead of the communication, within the memory bound
                while next_read < n:
                    st = states[next_read]
                    if st.t.parent is None and st.buffer is None:
                        if not alloc(st, forced=False):
                            break
                        submit_read(st)
                    next_read += 1
                # communication, strictly in the global order
                while next_issue < n:
                    st = states[next_issue]
                    if st.buffer is None:
                        if not alloc(st, forced=open_issued == 0):
                            break
                        if st.t.parent is None:
                            submit_read(st)
                        else:
                            watch("recv", st, dist.irecv(st.buffer, st.t.parent, group=self.group, tag=st.t.recv_tag))
                    if st.t.children:
                        if not (st.read_done if st.t.parent is None else st.recv_done):
                            break
                        post_sends(st)
                    st.issued = True
                    open_issued += 1
                    next_issue += 1
                # what is complete frees its buffer
                progressed = False
                for st in states[finished:next_issue]:
                    if st.finished or not self._complete(st):
                        continue
                    st.finished, st.buffer = True, None
                    inflight -= st.size
                    open_issued -= 1
                    progressed = True
                while finished < n and states[finished].finished:
                    finished += 1
                if progressed or finished == n:
                    continue
                kind, st, fut = events.get()
                self._handle(kind, st, fut, deliver)
                while True:  # drain whatever else is ready
                    try:
                        kind, st, fut = events.get_nowait()
                    except queue.Empty:
                        break
                    self._handle(kind, st, fut, deliver)
        finally:
            readers.shutdown(wait=True)
            waiters.shutdown(wait=False)
        if self._error is not None:
            raise self._error
        return self.stats

    def _complete(self, st: _State) -> bool:
        if not st.issued or st.sends_left:
            return False
        return st.read_done if st.t.parent is None else st.recv_done

    def _read_one(self, st: _State, read: Callable[[Transfer, torch.Tensor], None], poisoned: bool) -> None:
        """Fill a message this rank reads and seal it (a failure is sealed into it, and kept)."""
        assert st.buffer is not None
        host = st.buffer if st.buffer.device.type == "cpu" else torch.empty(st.size, dtype=torch.uint8)
        failure = None
        if poisoned or self._error is not None:
            failure = f"not read: rank {self.rank} failed earlier: {self._error_text}"
        else:
            try:
                read(st.t, host[: st.t.nbytes])
            except Exception as e:  # noqa: BLE001 - sealed into the message, raised at the end
                failure = f"rank {self.rank}: {type(e).__name__}: {e}"
                error = SharedReadError(
                    f"rank {self.rank} could not read {st.t.what()} for the ranks that share "
                    f"them: {e}", source_rank=self.rank,
                )
                error.__cause__ = e
                self._fail(error, failure)
        if failure is not None:
            st.failed = True
        self._seal(st, host, failure)
        if host is not st.buffer:
            st.buffer.copy_(host)

    def _handle(self, kind: str, st: _State, fut: Future, deliver: Callable[[Transfer, torch.Tensor], None]) -> None:
        error = fut.exception()
        if kind in ("send", "recv") and error is not None:
            raise error  # the process group itself failed: no schedule can be kept
        if kind == "read":
            if error is not None:  # a bug in sealing: nothing was sent
                raise error
            st.read_done = True
            if not st.failed and self._error is None:
                self._deliver(st, deliver)
        elif kind == "recv":
            st.recv_done = True
            self.stats.bytes_received += st.size
            self.stats.messages += 1
            problem = self._unseal(st)
            if problem is not None:
                st.failed = True
                self._fail(
                    SharedReadError(
                        f"rank {self.rank} could not load {st.t.what()}: rank {st.t.source} reads "
                        f"them for this rank and failed: {problem}", source_rank=st.t.source,
                    ),
                    f"rank {st.t.source} failed: {problem}",
                )
            elif self._error is None:
                self._deliver(st, deliver)
        else:
            st.sends_left -= 1

    def _deliver(self, st: _State, deliver: Callable[[Transfer, torch.Tensor], None]) -> None:
        assert st.buffer is not None
        try:
            deliver(st.t, st.buffer[: st.t.nbytes])
        except Exception as e:  # noqa: BLE001 - raised once the schedule has run
            self._fail(e, f"rank {self.rank}: {type(e).__name__}: {e}")


@dataclass
class PairTags:
    """Point-to-point tags: the k-th message between a directed pair of ranks, in the global
    order, has tag ``k`` on both sides."""

    counts: dict[tuple[int, int], int] = field(default_factory=dict)

    def next(self, src: int, dst: int) -> int:
        k = self.counts.get((src, dst), 0)
        self.counts[(src, dst)] = k + 1
        return k


__all__ = ["PairTags", "TRAILER", "Transfer", "TransferEngine", "TransferStats"]
