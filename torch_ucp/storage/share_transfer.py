"""Run one rank's shared reads (:mod:`torch_ucp.storage.sharing`): read what it reads for
others, send it; receive what others read for it; copy every payload into the targets.

- **One global order.** Every rank issues its messages in their global order (the same on
  every rank), as point-to-point ``isend`` / ``irecv`` on the load's process group (the k-th
  message between two ranks has tag k on both sides), and waits only for its oldest issued
  message or for its own reads. The oldest
  unfinished message of the whole job is then issued by all its members and completes, so
  every message does: no deadlock, whatever the bound on memory.
- **Overlap, bounded memory.** Reads run ahead in a thread pool while earlier messages are on
  the wire, as long as the buffers alive (reads ahead, messages in flight) stay within
  ``inflight_bytes`` (one message more when nothing is in flight, so any message can pass).
- **No copies where the bytes have a home.** A message whose payload is one contiguous region
  of a CPU target (on gloo: a piece of one tensor, the common case) is read, sent and received
  in place, in the target itself, and costs no buffer (not counted in ``inflight_bytes``): no
  staging allocation and no copy into the targets, which on a busy host is most of the CPU a
  shared read costs beyond the transfer.
- **Failures reach every receiver.** Each message's payload is followed by a trailer (a
  message of its own, the next tag): a status, the crc32c of the payload and, after a failed
  read, the reader's error text. A reader whose read fails still sends, marked failed; its
  receivers raise :class:`~torch_ucp.errors.SharedReadError` naming that rank and the
  tensors. Every rank runs its whole schedule before raising, so no rank is left waiting for
  a message; DCP then reports the errors on every rank.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from torch_ucp.errors import SharedReadError
from torch_ucp.metadata.checksums import crc32c
from torch_ucp.storage.sharing import Message

TRAILER = 256
_HEAD = struct.Struct("<IIII")  # magic, status, crc32c of the payload, error text bytes
_MAGIC = 0x53504355  # "UCPS"
_OK, _FAILED = 0, 1
_TEXT = TRAILER - _HEAD.size


@dataclass
class TransferStats:
    """Bytes this rank sent and received (payload and trailers), messages it took part in, and
    how many of those it read, sent or received in place (in a target, without a buffer)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    messages_in_place: int = 0


@dataclass
class _InFlight:
    message: Message
    payload: torch.Tensor
    trailer: torch.Tensor
    cost: int  # bytes of buffers it holds (0: in place)
    works: list = field(default_factory=list)
    received: bool = False


def seal(payload: torch.Tensor, failure: str | None) -> torch.Tensor:
    """The trailer of ``payload`` (CPU, uint8, contiguous): ``TRAILER`` bytes (CPU, uint8)."""
    text = (failure or "").encode("utf-8", "replace")[:_TEXT]
    crc = crc32c(memoryview(payload.numpy())) if failure is None else 0
    trailer = torch.zeros(TRAILER, dtype=torch.uint8)
    view = trailer.numpy()
    view[: _HEAD.size] = memoryview(_HEAD.pack(_MAGIC, _FAILED if failure else _OK, crc, len(text)))
    view[_HEAD.size : _HEAD.size + len(text)] = memoryview(text)
    return trailer


def unseal(payload: torch.Tensor, trailer: torch.Tensor) -> str | None:
    """Check a received payload against its trailer: ``None`` if good, else what is wrong."""
    head = trailer.cpu().numpy().tobytes()
    magic, status, crc, n = _HEAD.unpack_from(head)
    if magic != _MAGIC:
        return "the message has no valid trailer"
    if status != _OK:
        return head[_HEAD.size : _HEAD.size + min(n, _TEXT)].decode("utf-8", "replace")
    got = crc32c(memoryview(payload.cpu().numpy()))
    if got != crc:
        return f"its {payload.numel()} bytes arrived with crc32c {got:08x}, {crc:08x} was sent (damaged in transfer)"
    return None


class ShareTransfers:
    """Runs a rank's messages (see the module docstring).

    Args:
        rank: this rank's global rank.
        group: the load's process group (``None``: the default group).
        device: where message buffers live: ``cpu`` (gloo) or a CUDA device (NCCL).
        inflight_bytes: bound on the bytes of message buffers alive at once.
        read_workers: messages read from storage at once.
    """

    def __init__(
        self,
        rank: int,
        group: dist.ProcessGroup | None,
        device: torch.device,
        inflight_bytes: int,
        read_workers: int,
    ) -> None:
        self.rank = rank
        self.group = group
        self.device = device
        self.inflight_bytes = inflight_bytes
        self.read_workers = max(1, read_workers)
        self.stats = TransferStats()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def run(
        self,
        messages: Sequence[Message],
        read: Callable[[Message, torch.Tensor], None],
        deliver: Callable[[Message, torch.Tensor], None],
        in_place: Callable[[Message], torch.Tensor | None] = lambda m: None,
    ) -> None:
        """Run ``messages`` (this rank's, any order). ``read(m, payload)`` fills the payload of a
        message this rank reads (in a worker thread); ``deliver(m, payload)`` copies a good
        payload into this rank's targets (in this thread). ``in_place(m)``: the payload's home
        in a target (contiguous CPU uint8 of ``m.nbytes``), or ``None`` for a buffer; used only
        where messages travel on the CPU. Raises the first error once every message has been
        sent or received."""
        order = sorted(messages, key=lambda m: m.order)
        mine = [m for m in order if m.reader == self.rank]
        home = {m.order: self._home(m, in_place) for m in order}
        pairs: dict[tuple[int, int], int] = {}

        def tags(src: int, dst: int) -> tuple[int, int]:
            """The k-th message from ``src`` to ``dst``: tag 2k for its payload, 2k+1 for its trailer."""
            k = pairs.get((src, dst), 0)
            pairs[(src, dst)] = k + 1
            return 2 * k, 2 * k + 1

        def cost(m: Message) -> int:
            return 0 if home[m.order] is not None else m.nbytes

        reads: dict[tuple[int, int], Future[tuple[torch.Tensor, torch.Tensor, bool]]] = {}
        alive = 0  # bytes of buffers alive: reads ahead and messages in flight
        in_flight: deque[_InFlight] = deque()
        next_read = 0
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="ucp-share-read")

        def submit_read() -> None:
            nonlocal next_read, alive
            m = mine[next_read]
            reads[m.order] = pool.submit(self._read_one, m, home[m.order], read)
            alive += cost(m)
            next_read += 1

        def read_ahead() -> None:
            while next_read < len(mine) and (alive == 0 or alive + cost(mine[next_read]) <= self.inflight_bytes):
                submit_read()

        def finish_oldest() -> None:
            nonlocal alive
            f = in_flight.popleft()
            for w in f.works:
                w.wait()
            if f.received:
                self.stats.bytes_received += f.message.nbytes + TRAILER
                problem = unseal(f.payload, f.trailer)
                if problem is not None:
                    self._fail(SharedReadError(
                        f"rank {self.rank} could not load {f.message.describe()}: rank {f.message.reader} "
                        f"reads them for ranks {list(f.message.members)} and failed: {problem}",
                        source_rank=f.message.reader,
                    ))
                elif self.error is None:
                    self._deliver(f.message, f.payload, deliver)
            alive -= f.cost

        try:
            for m in order:
                read_ahead()
                while in_flight and alive + (0 if m.order in reads else cost(m)) > self.inflight_bytes:
                    finish_oldest()
                if m.reader == self.rank:
                    if m.order not in reads:  # read ahead could not take it: read it now
                        submit_read()
                    payload, trailer, good = reads.pop(m.order).result()
                    wire, wire_trailer = payload.to(self.device), trailer.to(self.device)
                    works = []
                    for dst in m.receivers:
                        payload_tag, trailer_tag = tags(self.rank, dst)
                        works.append(dist.isend(wire, dst, group=self.group, tag=payload_tag))
                        works.append(dist.isend(wire_trailer, dst, group=self.group, tag=trailer_tag))
                    self.stats.bytes_sent += (m.nbytes + TRAILER) * len(m.receivers)
                    if good and self.error is None:
                        self._deliver(m, payload, deliver)
                    in_flight.append(_InFlight(m, wire, wire_trailer, cost(m), works))
                else:
                    payload = home[m.order]
                    if payload is None:
                        payload = torch.empty(m.nbytes, dtype=torch.uint8, device=self.device)
                    trailer = torch.empty(TRAILER, dtype=torch.uint8, device=self.device)
                    payload_tag, trailer_tag = tags(m.reader, self.rank)
                    works = [dist.irecv(payload, m.reader, group=self.group, tag=payload_tag),
                             dist.irecv(trailer, m.reader, group=self.group, tag=trailer_tag)]
                    alive += cost(m)
                    in_flight.append(_InFlight(m, payload, trailer, cost(m), works, received=True))
                self.stats.messages += 1
                self.stats.messages_in_place += home[m.order] is not None
            while in_flight:
                finish_oldest()
        finally:
            pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error

    def _home(self, m: Message, in_place: Callable[[Message], torch.Tensor | None]) -> torch.Tensor | None:
        """Where ``m``'s payload lives in place, if anywhere (see :meth:`run`)."""
        if self.device.type != "cpu":
            return None  # the wire is device memory: a host target cannot be sent in place
        target = in_place(m)
        if target is None:
            return None
        if not (target.device.type == "cpu" and target.dtype == torch.uint8 and target.is_contiguous()
                and target.numel() == m.nbytes):
            raise ValueError(f"{m.describe()}: its in-place payload must be contiguous CPU uint8 of "
                             f"{m.nbytes} bytes, got {target.dtype} {tuple(target.shape)} on {target.device}")
        return target

    def _read_one(
        self, m: Message, home: torch.Tensor | None, read: Callable[[Message, torch.Tensor], None]
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """A message's payload (``home`` or a new buffer), read, its trailer, and whether the read
        succeeded (a failed read is sealed as failed, and its error kept)."""
        payload = home if home is not None else torch.empty(m.nbytes, dtype=torch.uint8)
        failure = None
        try:
            read(m, payload)
        except Exception as e:  # noqa: BLE001 - sealed into the message, raised at the end
            failure = f"{type(e).__name__}: {e}"
            error = SharedReadError(
                f"rank {self.rank} could not read {m.describe()} for ranks {list(m.receivers)}: {e}",
                source_rank=self.rank,
            )
            error.__cause__ = e
            self._fail(error)
        return payload, seal(payload, failure), failure is None

    def _deliver(self, m: Message, buffer: torch.Tensor, deliver: Callable[[Message, torch.Tensor], None]) -> None:
        try:
            deliver(m, buffer.cpu())
        except Exception as e:  # noqa: BLE001 - raised once the schedule has run
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._lock:  # reads fail in worker threads
            if self.error is None:
                self.error = error


__all__ = ["TRAILER", "ShareTransfers", "TransferStats", "seal", "unseal"]
