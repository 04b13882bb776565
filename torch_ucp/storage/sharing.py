"""Read once, share: which rank reads the bytes that several loading ranks need.

Replicas of a loading job (HSDP and DP replica groups, TP-replicated norms, plain tensors that
every rank loads whole) need the same bytes. Instead of every replica reading them from
storage, one member of each group reads each piece and the others receive it from that rank
(:mod:`torch_ucp.storage.broadcast` runs the transfers). The plan is made inside ``dcp.load``:

1. **Classes** (each rank, :meth:`UCPLoadPlanner.create_local_plan`): every read item is tagged
   with the layout of its target (:func:`share_class`): a plain tensor, or a DTensor with a
   replicated mesh dimension. Items of fully sharded DTensors are held by one rank: untagged.
2. **Summary** (each rank, :meth:`UCPReader.prepare_local_plan`): per class, the sorted distinct
   rows ``(tensor, box)`` the rank needs and their 128-bit BLAKE2b digest
   (:class:`NeedSummary`: 24 bytes per class, a few classes per rank; never the rows).
3. **Sets** (coordinator, :meth:`UCPReader.prepare_global_plan`): ranks whose classes have the
   same digest need exactly the same bytes. Each distinct list of such ranks is a *share set*;
   every rank gets the sets it is in (:class:`ShareAssignment`).
4. **Schedule** (each member, in ``read_data``): the set's rows are split into parts of at most
   ``message_bytes``, the parts dealt to the members by bytes (least loaded first), and each
   member's parts packed into messages (:func:`set_messages`). Every member computes this from
   the same rows, so all agree without exchanging anything more.

Boxes that several ranks need only in part (two different boxes that overlap) are read by
each of them: replicas hold identical boxes, which is what this shares.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Shard

ALIGN = 16
"""Bytes; each part starts at a multiple of this in a message (element-aligned for every dtype)."""


# -- classes: the planner's tags ------------------------------------------------------------------
def share_class(target: torch.Tensor) -> str | None:
    """The sharing class of a target tensor: ``None`` if every element is held by one rank
    (a DTensor sharded over every mesh dim of size > 1), else a token naming its layout."""
    if isinstance(target, DTensor):
        mesh = target.device_mesh
        if all(isinstance(p, Shard) for p, n in zip(target.placements, mesh.shape) if n > 1):
            return None
        ranks = mesh.mesh.reshape(-1).tolist()
        token = repr((tuple(mesh.shape), ranks, [str(p) for p in target.placements]))
        return "dtensor:" + hashlib.blake2b(token.encode(), digest_size=8).hexdigest()
    return "plain"


class ReadClasses:
    """The sharing class of each item of a local load plan (``LoadPlan.planner_data`` of
    :class:`~torch_ucp.UCPLoadPlanner`). It stays on its rank: pickled, it is ``None``."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = list(labels)

    @classmethod
    def of(cls, items: Sequence[Any], state_dict: dict[str, Any]) -> ReadClasses:
        """Tag tensor items by their target's :func:`share_class` (values: ``-1``)."""
        tokens: dict[str, int] = {}
        by_fqn: dict[str, int] = {}
        labels = []
        for item in items:
            fqn = item.dest_index.fqn
            label = by_fqn.get(fqn)
            if label is None:
                target = state_dict.get(fqn)
                token = share_class(target) if isinstance(target, torch.Tensor) else None
                label = -1 if token is None else tokens.setdefault(token, len(tokens))
                by_fqn[fqn] = label
            labels.append(label if item.type.name != "BYTE_IO" else -1)
        return cls(labels)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_none, ())


def _none() -> None:
    return None


# -- rows and summaries ---------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Row:
    """A distinct box of a stored tensor that a rank reads (inside one fragment): the tensor's
    position in the header's tensor table and the box in its global coordinates."""

    tensor: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)


def rows_digest(rows: Sequence[Row]) -> bytes:
    """The 16-byte BLAKE2b digest of sorted rows (each as ``tensor, ndim, offsets, lengths``)."""
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update(np.array([r.tensor, len(r.offsets), *r.offsets, *r.lengths], dtype="<i8").tobytes())
    return h.digest()


@dataclass
class NeedSummary:
    """What one rank tells the coordinator about its shareable reads (``LoadPlan.storage_data``):
    per class, the digest of its rows and their bytes.

    Attributes:
        rank: the rank's global rank.
        group_size: ranks in the reader's process group (must be the group ``dcp.load`` runs on).
        transport: ``"cpu"`` (a gloo backend), ``"cuda"`` (NCCL) or ``None`` (cannot send).
        share: this rank wants its shared bytes from one reader (``share_reads``).
        verify: this rank was asked for ``verify_load``.
        digests: 16 bytes per class. nbytes: per class, its bytes.
    """

    rank: int
    group_size: int
    transport: str | None
    share: bool
    verify: bool
    digests: bytes
    nbytes: np.ndarray

    @property
    def classes(self) -> int:
        return len(self.digests) // 16

    def digest(self, c: int) -> bytes:
        return self.digests[16 * c : 16 * (c + 1)]


@dataclass(frozen=True)
class ShareSet:
    """Ranks that need exactly the same rows: ``members`` (global ranks, sorted) and, for the
    rank this is sent to, which of its classes hold them."""

    id: int
    members: tuple[int, ...]
    classes: tuple[int, ...]

    def __reduce__(self) -> tuple[Any, ...]:  # members as zlib'd deltas: small for large sets
        return (_unpack_set, (self.id, _pack_ranks(self.members), self.classes))


def _pack_ranks(ranks: Sequence[int]) -> bytes:
    a = np.asarray(ranks, dtype=np.int64)
    return zlib.compress(np.diff(a, prepend=0).astype("<i4").tobytes(), 6)


def _unpack_set(id: int, packed: bytes, classes: tuple[int, ...]) -> ShareSet:
    deltas = np.frombuffer(zlib.decompress(packed), dtype="<i4")
    return ShareSet(id, tuple(np.cumsum(deltas, dtype=np.int64).tolist()), classes)


@dataclass
class ShareAssignment:
    """The coordinator's answer to one rank (``LoadPlan.storage_data``).

    Attributes:
        sets: the share sets the rank is in.
        share: run transfers (else the sets serve only ``verify_load``'s counting).
        verify: every rank runs ``verify_load``.
        message_bytes / fanout: the schedule's parameters (the coordinator's knobs, so that
            every member computes the same schedule).
        problem: why the collectives of this load cannot run (every rank raises it).
    """

    sets: list[ShareSet] = field(default_factory=list)
    share: bool = False
    verify: bool = False
    message_bytes: int = 16 << 20
    fanout: int = 8
    problem: str | None = None


def plan_sharing(summaries: Sequence[NeedSummary], message_bytes: int, fanout: int) -> list[ShareAssignment]:
    """The coordinator's step: the share sets of every rank, from every rank's summary (in
    process-group order)."""
    n = len(summaries)
    share = all(s.share for s in summaries)
    verify = any(s.verify for s in summaries)
    problem = None
    if verify and not all(s.verify for s in summaries):
        problem = "verify_load must be given to the UCPReader of every rank (some ranks did not)"
    sizes = sorted({s.group_size for s in summaries})
    if (share or verify) and sizes != [n] and n > 1:
        problem = (
            f"UCPReader's process group has {sizes} ranks but dcp.load runs on {n}: pass the "
            "process group dcp.load uses as UCPReader(process_group=...)"
        )
    transports = {s.transport for s in summaries}
    share = share and len(transports) == 1 and None not in transports
    holders: dict[bytes, list[tuple[int, int]]] = {}
    for i, s in enumerate(summaries):
        for c in range(s.classes):
            if s.nbytes[c] > 0:
                holders.setdefault(s.digest(c), []).append((i, c))
    by_members: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for found in holders.values():
        members = tuple(sorted({summaries[i].rank for i, _ in found}))
        if len(members) > 1:
            by_members.setdefault(members, []).extend(found)
    out = [ShareAssignment(share=share, verify=verify, message_bytes=message_bytes, fanout=fanout,
                           problem=problem) for _ in summaries]
    for set_id, members in enumerate(sorted(by_members)):
        mine: dict[int, list[int]] = {}
        for i, c in by_members[members]:
            mine.setdefault(i, []).append(c)
        for i, classes in mine.items():
            out[i].sets.append(ShareSet(set_id, members, tuple(sorted(classes))))
    return out


# -- the schedule of one set ----------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A box of a row read and sent as one piece: ``offsets``/``lengths`` in the tensor's global
    coordinates, at byte ``at`` of its message's payload."""

    row: int  # index into the set's rows
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    nbytes: int
    at: int = 0


@dataclass(frozen=True)
class Message:
    """One reader's batch of parts, sent down the set's tree rooted at the reader."""

    set_id: int
    round: int
    reader: int  # position in the set's members
    parts: tuple[Part, ...]
    nbytes: int  # payload bytes

    @property
    def order(self) -> tuple[int, int, int]:
        """Position in the load's global message order (the same on every rank)."""
        return (self.set_id, self.round, self.reader)


def split_box(offsets: Sequence[int], lengths: Sequence[int], itemsize: int, max_bytes: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``offsets``/``lengths`` cut into C-order boxes of at most ``max_bytes`` (at least one
    element each): along the first dim whose trailing slab fits, enumerating the dims before."""
    offsets, lengths = tuple(offsets), tuple(lengths)
    if math.prod(lengths) * itemsize <= max_bytes or not lengths:
        return [(offsets, lengths)]
    d = 0
    while d < len(lengths) - 1 and math.prod(lengths[d + 1 :]) * itemsize > max_bytes:
        d += 1
    slab = math.prod(lengths[d + 1 :]) * itemsize
    step = max(1, max_bytes // slab)
    out = []
    for lead in np.ndindex(*lengths[:d]):
        head = tuple(o + i for o, i in zip(offsets[:d], lead))
        for start in range(0, lengths[d], step):
            n = min(step, lengths[d] - start)
            out.append((head + (offsets[d] + start,) + offsets[d + 1 :], (1,) * d + (n,) + lengths[d + 1 :]))
    return out


def set_messages(
    set_id: int, members: int, rows: Sequence[Row], itemsizes: Sequence[int], message_bytes: int
) -> list[Message]:
    """The messages of one share set: every row split into parts of at most ``message_bytes``,
    the parts dealt to the ``members`` by bytes (each to the least loaded so far, the lowest
    position on ties), each member's parts packed in order into messages of at most
    ``message_bytes``. ``itemsizes[i]`` is the element size of ``rows[i]``'s tensor."""
    heap = [(0, m) for m in range(members)]  # (bytes dealt, position): least loaded first
    mine: list[list[Part]] = [[] for _ in range(members)]
    for i, row in enumerate(rows):
        for off, lens in split_box(row.offsets, row.lengths, itemsizes[i], message_bytes):
            nbytes = math.prod(lens) * itemsizes[i]
            load, p = heapq.heappop(heap)
            heapq.heappush(heap, (load + nbytes, p))
            mine[p].append(Part(i, off, lens, nbytes))
    out = []
    for p, parts in enumerate(mine):
        batches: list[list[Part]] = []
        at = 0
        for part in parts:
            if not batches or (at + part.nbytes > message_bytes and batches[-1]):
                batches.append([])
                at = 0
            batches[-1].append(Part(part.row, part.offsets, part.lengths, part.nbytes, at))
            at += -(-part.nbytes // ALIGN) * ALIGN
        for r, batch in enumerate(batches):
            last = batch[-1]
            out.append(Message(set_id, r, p, tuple(batch), last.at + last.nbytes))
    out.sort(key=lambda m: m.order)
    return out


def tree(members: int, reader: int, fanout: int) -> tuple[dict[int, int], dict[int, list[int]]]:
    """The ``fanout``-ary tree over a set's member positions rooted at ``reader``: ``(parent,
    children)`` by position. Positions are rotated so the reader is node 0."""
    parent: dict[int, int] = {}
    children: dict[int, list[int]] = {}
    for node in range(members):
        pos = (node + reader) % members
        kids = [(c + reader) % members for c in range(node * fanout + 1, min(node * fanout + fanout + 1, members))]
        children[pos] = kids
        for k in kids:
            parent[k] = pos
    return parent, children


def canonical(rows: Iterable[Row]) -> list[Row]:
    """Distinct rows, sorted: the order every member of a set agrees on."""
    return sorted(set(rows))


__all__ = [
    "Message",
    "NeedSummary",
    "Part",
    "ReadClasses",
    "Row",
    "ShareAssignment",
    "ShareSet",
    "canonical",
    "plan_sharing",
    "rows_digest",
    "set_messages",
    "share_class",
    "split_box",
    "tree",
]
