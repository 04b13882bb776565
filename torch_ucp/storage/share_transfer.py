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
- **Failures reach every receiver.** Each message ends in a trailer: a status, the crc32c of
  the payload and, after a failed read, the reader's error text. A reader whose read fails
  still sends, marked failed; its receivers raise :class:`~torch_ucp.errors.SharedReadError`
  naming that rank and the tensors. Every rank runs its whole schedule before raising, so no
  rank is left waiting for a message; DCP then reports the errors on every rank.
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
    """Bytes this rank sent and received (payload and trailers) and messages it took part in."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0


@dataclass
class _InFlight:
    message: Message
    buffer: torch.Tensor
    works: list = field(default_factory=list)
    received: bool = False


def seal(buffer: torch.Tensor, nbytes: int, failure: str | None) -> None:
    """Write the trailer after the ``nbytes`` of payload in ``buffer`` (CPU, uint8)."""
    payload = memoryview(buffer.numpy())[:nbytes]
    text = (failure or "").encode("utf-8", "replace")[:_TEXT]
    crc = crc32c(payload) if failure is None else 0
    trailer = buffer[nbytes:].numpy()
    trailer[:] = 0
    trailer[: _HEAD.size] = memoryview(_HEAD.pack(_MAGIC, _FAILED if failure else _OK, crc, len(text)))
    trailer[_HEAD.size : _HEAD.size + len(text)] = memoryview(text)


def unseal(buffer: torch.Tensor, nbytes: int) -> str | None:
    """Check a received message's trailer and payload: ``None`` if good, else what is wrong."""
    host = buffer.cpu()
    trailer = host[nbytes:].numpy().tobytes()
    magic, status, crc, n = _HEAD.unpack_from(trailer)
    if magic != _MAGIC:
        return "the message has no valid trailer"
    if status != _OK:
        return trailer[_HEAD.size : _HEAD.size + min(n, _TEXT)].decode("utf-8", "replace")
    got = crc32c(memoryview(host.numpy())[:nbytes])
    if got != crc:
        return f"its {nbytes} bytes arrived with crc32c {got:08x}, {crc:08x} was sent (damaged in transfer)"
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
    ) -> None:
        """Run ``messages`` (this rank's, any order). ``read(m, payload)`` fills the payload of a
        message this rank reads (in a worker thread); ``deliver(m, payload)`` copies a good
        payload into this rank's targets (in this thread). Raises the first error once every
        message has been sent or received."""
        order = sorted(messages, key=lambda m: m.order)
        mine = [m for m in order if m.reader == self.rank]
        pairs: dict[tuple[int, int], int] = {}

        def tag(src: int, dst: int) -> int:
            k = pairs.get((src, dst), 0)
            pairs[(src, dst)] = k + 1
            return k

        reads: dict[tuple[int, int], Future[tuple[torch.Tensor, bool]]] = {}
        alive = 0  # bytes of buffers alive: reads ahead and messages in flight
        in_flight: deque[_InFlight] = deque()
        next_read = 0
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="ucp-share-read")

        def size(m: Message) -> int:
            return m.nbytes + TRAILER

        def read_ahead() -> None:
            nonlocal next_read, alive
            while next_read < len(mine) and (alive == 0 or alive + size(mine[next_read]) <= self.inflight_bytes):
                m = mine[next_read]
                reads[m.order] = pool.submit(self._read_one, m, read)
                alive += size(m)
                next_read += 1

        def finish_oldest() -> None:
            nonlocal alive
            f = in_flight.popleft()
            for w in f.works:
                w.wait()
            if f.received:
                self.stats.bytes_received += size(f.message)
                problem = unseal(f.buffer, f.message.nbytes)
                if problem is not None:
                    self._fail(SharedReadError(
                        f"rank {self.rank} could not load {f.message.describe()}: rank {f.message.reader} "
                        f"reads them for ranks {list(f.message.members)} and failed: {problem}",
                        source_rank=f.message.reader,
                    ))
                elif self.error is None:
                    self._deliver(f.message, f.buffer, deliver)
            alive -= size(f.message)

        try:
            for m in order:
                read_ahead()
                while in_flight and alive + (0 if m.order in reads else size(m)) > self.inflight_bytes:
                    finish_oldest()
                if m.reader == self.rank:
                    if m.order not in reads:  # read ahead could not take it: read it now
                        reads[m.order] = pool.submit(self._read_one, m, read)
                        alive += size(m)
                        next_read += 1
                    buffer, good = reads.pop(m.order).result()
                    device_buffer = buffer.to(self.device, non_blocking=False)
                    works = [dist.isend(device_buffer, dst, group=self.group, tag=tag(self.rank, dst))
                             for dst in m.receivers]
                    self.stats.bytes_sent += size(m) * len(works)
                    if good and self.error is None:
                        self._deliver(m, buffer, deliver)
                    in_flight.append(_InFlight(m, device_buffer, works))
                else:
                    buffer = torch.empty(size(m), dtype=torch.uint8, device=self.device)
                    works = [dist.irecv(buffer, m.reader, group=self.group, tag=tag(m.reader, self.rank))]
                    alive += size(m)
                    in_flight.append(_InFlight(m, buffer, works, received=True))
                self.stats.messages += 1
            while in_flight:
                finish_oldest()
        finally:
            pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error

    def _read_one(self, m: Message, read: Callable[[Message, torch.Tensor], None]) -> tuple[torch.Tensor, bool]:
        """A message's buffer, read and sealed, and whether the read succeeded (a failed read is
        sealed as failed, and its error kept)."""
        buffer = torch.empty(m.nbytes + TRAILER, dtype=torch.uint8)
        failure = None
        try:
            read(m, buffer[: m.nbytes])
        except Exception as e:  # noqa: BLE001 - sealed into the message, raised at the end
            failure = f"{type(e).__name__}: {e}"
            error = SharedReadError(
                f"rank {self.rank} could not read {m.describe()} for ranks {list(m.receivers)}: {e}",
                source_rank=self.rank,
            )
            error.__cause__ = e
            self._fail(error)
        seal(buffer, m.nbytes, failure)
        return buffer, failure is None

    def _deliver(self, m: Message, buffer: torch.Tensor, deliver: Callable[[Message, torch.Tensor], None]) -> None:
        try:
            deliver(m, buffer[: m.nbytes].cpu() if buffer.device.type != "cpu" else buffer[: m.nbytes])
        except Exception as e:  # noqa: BLE001 - raised once the schedule has run
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._lock:  # reads fail in worker threads
            if self.error is None:
                self.error = error


__all__ = ["TRAILER", "ShareTransfers", "TransferStats", "seal", "unseal"]
