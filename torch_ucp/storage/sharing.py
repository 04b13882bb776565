"""Read once, share: which rank reads the bytes that several loading ranks need.

Replicas of a loading job (HSDP and DP replica groups, TP-replicated norms and biases, plain
tensors every rank loads whole) plan the same read boxes. The plan is made inside ``dcp.load``
without sending any box to the coordinator (load plans stay on their ranks):

1. **Summary** (each rank, ``prepare_local_plan``): per stored tensor it reads, the 64-bit
   BLAKE2b digest of the sorted boxes it needs of it (:class:`ShareRequest`: 12 bytes a tensor),
   leaving out tensors it reads only for DTensors replicated on no dim of a mesh that spans the
   group (FSDP / TP shards: no other rank needs their boxes).
2. **Sets** (coordinator, ``prepare_global_plan``): ranks with the same digest for a tensor
   need exactly the same boxes of it. Tensors needed by the same list of ranks form one *share
   set*; every rank gets the sets it is in (:class:`ShareSet`), evenly spaced members as a
   ``range``, so what a rank is sent does not grow with the world size for replica groups.
   Grouping is vectorized (numpy) over every rank's (tensor, digest) pairs.
3. **Messages** (each member, ``read_data``): the set's boxes are cut into parts of at most
   ``message_bytes`` (:func:`split_box`), each part dealt to the member dealt the fewest bytes
   so far (a heap), and each member's parts packed into messages (:func:`set_messages`). Every member
   computes this from the same boxes, so all agree without exchanging anything more; messages
   run in the order (set, message) on every rank (:mod:`torch_ucp.storage.share_transfer`).

Boxes that ranks need only in part (two different boxes that overlap) are read by each of
them: replicas plan identical boxes, which is what this shares.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

ALIGN = 16
"""Bytes; every part starts at a multiple of this in its message (aligned for every dtype)."""

Box = tuple[str, tuple[int, ...], tuple[int, ...]]
"""A stored tensor's box: its name, global offsets and lengths."""


def box_of(item: ReadItem) -> Box:
    """The stored box a tensor read item needs, in its tensor's global coordinates."""
    offsets = tuple(c + o for c, o in zip(item.storage_index.offset, item.storage_offsets))
    return item.storage_index.fqn, offsets, tuple(item.lengths)


@dataclass(frozen=True)
class ShareRequest:
    """One rank's summary for the coordinator (in ``LoadPlan.storage_data``).

    Attributes:
        rank: its global rank. group_size: ranks in the process group it would send on.
        tensors: positions (in the header's tensor table) of the tensors it reads that another
            rank may need too (see :func:`summarize`).
        digests: per tensor, the digest of its sorted boxes of it.
    """

    rank: int
    group_size: int
    tensors: np.ndarray  # int32 (positions; int32 keeps the gather small)
    digests: np.ndarray  # uint64


def summarize(
    rank: int,
    group_size: int,
    items: Sequence[ReadItem],
    position: dict[str, int],
    unreplicated: AbstractSet[str] = frozenset(),
) -> ShareRequest:
    """This rank's :class:`ShareRequest` for its tensor read ``items``. A stored tensor read
    only for ``unreplicated`` targets (target keys no other rank of the group loads the same
    part of) is left out: no other rank can need its boxes, and leaving it out keeps the
    gather and the coordinator's grouping to the tensors that can be shared."""
    boxes: dict[str, set[Box]] = {}
    wanted: set[str] = set()
    for item in items:
        if item.type != LoadItemType.BYTE_IO:
            box = box_of(item)
            boxes.setdefault(box[0], set()).add(box)
            if item.dest_index.fqn not in unreplicated:
                wanted.add(box[0])
    names = sorted(wanted, key=lambda n: position[n])
    digests = []
    for name in names:
        h = hashlib.blake2b(digest_size=8)
        for _, offsets, lengths in sorted(boxes[name]):
            h.update(np.array([len(offsets), *offsets, *lengths], dtype="<i8").tobytes())
        digests.append(int.from_bytes(h.digest(), "little"))
    return ShareRequest(rank, group_size, np.array([position[n] for n in names], dtype=np.int32),
                        np.array(digests, dtype=np.uint64))


@dataclass(frozen=True)
class ShareSet:
    """Ranks (``members``, global, ascending) that need the same boxes of ``tensors`` (positions).

    ``members`` is a ``range`` where the ranks are evenly spaced (replica groups of a mesh: all
    of them, or one rank every DP stride), so what a rank is sent does not grow with the world.
    """

    id: int
    members: range | tuple[int, ...]
    tensors: frozenset[int]


def _members(ranks: list[int]) -> range | tuple[int, ...]:
    """``ranks`` (ascending) as a ``range`` where evenly spaced, else as a tuple."""
    steps = np.diff(ranks)
    if steps[0] > 0 and (steps == steps[0]).all():
        return range(ranks[0], ranks[-1] + 1, int(steps[0]))
    return tuple(ranks)


def _pair_key(tensors: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each (tensor, digest) pair: equal pairs have equal keys."""
    return digests ^ (tensors.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def _any_pair_repeats(key: np.ndarray) -> bool:
    """Whether two pairs may be equal (their keys are): else no two classes share a box. One
    unstable sort, half the time of the stable one that grouping needs."""
    ordered = np.sort(key)
    return bool(np.any(ordered[1:] == ordered[:-1]))


def _pair_order(tensors: np.ndarray, digests: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A stable order that makes equal (tensor, digest) pairs contiguous (each group's ranks
    stay ascending). One sort of their 64-bit ``key`` (a third of ``lexsort``'s time),
    checked: where two pairs share a key, ``lexsort`` decides."""
    order = np.argsort(key, kind="stable")
    key, sorted_tensors = key[order], tensors[order]
    if np.any((key[1:] == key[:-1]) & (sorted_tensors[1:] != sorted_tensors[:-1])):
        return np.lexsort((digests, tensors))
    return order  # equal keys and equal tensors: equal digests too (xor is a bijection)


_WEIGHT_SEED = 0x5EED5E75
"""Seed of the per-rank weights of the member-list fingerprint (fixed: a plan is reproducible)."""


def plan_sharing(requests: Sequence[object], group_size: int) -> list[list[ShareSet]] | None:
    """The coordinator's step: the share sets of every rank (in process-group order), or
    ``None`` where the load cannot share: fewer than two ranks, a rank that does not ask to
    share, or a reader whose process group is not the one ``dcp.load`` runs on.

    Vectorized: ranks with equal requests form a class; one sort over the classes' (tensor,
    digest) pairs groups the classes needing the same boxes of a tensor, and a fingerprint of
    each group's class list (checked exactly) groups the tensors needed by the same ranks.
    Python touches only the ranks' requests and the distinct sets."""
    if group_size < 2 or not all(isinstance(r, ShareRequest) for r in requests):
        return None
    found = [r for r in requests if isinstance(r, ShareRequest)]
    if any(r.group_size != group_size for r in found) or len({r.rank for r in found}) != len(found):
        return None
    # Ranks asking for exactly the same (replicas, mostly) form one class: the sort below runs
    # over one request a class (DP: one in all; HSDP: one a replica group).
    classes: dict[bytes, int] = {}
    reps: list[ShareRequest] = []
    class_ranks: list[list[int]] = []
    for r in sorted(found, key=lambda r: r.rank):
        key = np.asarray(r.tensors, dtype=np.int64).tobytes() + np.asarray(r.digests, dtype=np.uint64).tobytes()
        k = classes.setdefault(key, len(reps))
        if k == len(reps):
            reps.append(r)
            class_ranks.append([])
        class_ranks[k].append(r.rank)
    del classes
    counts = np.array([len(r.tensors) for r in reps], dtype=np.int64)
    if counts.sum() == 0:
        return [[] for _ in found]
    tensors = np.concatenate([np.asarray(r.tensors, dtype=np.int64) for r in reps])
    digests = np.concatenate([np.asarray(r.digests, dtype=np.uint64) for r in reps])
    key = _pair_key(tensors, digests)
    if len(reps) == len(found) and not _any_pair_repeats(key):
        return [[] for _ in found]  # no replicas: every box is one rank's (FSDP, TP, PP loads)
    owners = np.repeat(np.arange(len(reps), dtype=np.int32), counts)  # the class of each pair
    del counts
    order = _pair_order(tensors, digests, key)
    del key
    tensors, digests, owners = tensors[order], digests[order], owners[order]
    del order
    new = np.empty(len(tensors), dtype=bool)
    new[0] = True
    new[1:] = (tensors[1:] != tensors[:-1]) | (digests[1:] != digests[:-1])
    del digests
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(tensors)))  # classes in each group
    class_size = np.array([len(c) for c in class_ranks], dtype=np.int64)
    shared = np.add.reduceat(class_size[owners], starts) > 1  # else one rank needs it: it reads it
    keep = shared[np.cumsum(new) - 1]
    del new
    tensors, owners = tensors[keep], owners[keep]
    del keep
    sizes = sizes[shared]
    if len(sizes) == 0:
        return [[] for _ in found]
    starts = np.cumsum(np.concatenate(([0], sizes[:-1])))  # in the kept arrays
    group_of = np.repeat(np.arange(len(starts)), sizes)
    # Fingerprint of each group's class list: a sum of random 64-bit weights (wrapping).
    weights = np.random.default_rng(_WEIGHT_SEED).integers(0, 2**64, size=len(reps), dtype=np.uint64)
    fingerprint = np.add.reduceat(weights[owners], starts) ^ sizes.astype(np.uint64)
    _, first, kind = np.unique(fingerprint, return_index=True, return_inverse=True)
    kind = kind.reshape(-1)
    # Exact check: every group has the same classes as the first group of its fingerprint.
    rep = first[kind]
    if not np.array_equal(sizes, sizes[rep]):
        return None  # fingerprint collision (about 2**-64 a pair): read without sharing
    within = np.arange(len(owners)) - starts[group_of]
    if not np.array_equal(owners, owners[starts[rep][group_of] + within]):
        return None
    del group_of, within, rep
    # The distinct sets, by their ranks (ascending, as tuples compare): the ids of the plan.
    distinct = [sorted(m for c in owners[starts[g] : starts[g] + sizes[g]].tolist() for m in class_ranks[c])
                for g in first]
    by_members = sorted(range(len(distinct)), key=lambda k: distinct[k])
    set_id = np.empty(len(distinct), dtype=np.int64)
    set_id[by_members] = np.arange(len(distinct))
    group_set = set_id[kind]
    by_set = np.argsort(group_set, kind="stable")
    bounds = np.searchsorted(group_set[by_set], np.arange(len(distinct) + 1))
    set_tensors = tensors[starts][by_set]
    sets = [ShareSet(i, _members(distinct[k]), frozenset(set_tensors[bounds[i] : bounds[i + 1]].tolist()))
            for i, k in enumerate(by_members)]
    mine: dict[int, list[ShareSet]] = {r.rank: [] for r in found}
    for s in sets:
        for m in s.members:
            mine[m].append(s)
    return [mine[r.rank] for r in found]


@dataclass(frozen=True)
class Part:
    """A box of a shared read box, at byte ``at`` of its message's payload."""

    box: Box
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    nbytes: int
    at: int


@dataclass(frozen=True)
class Message:
    """One read by ``reader`` (a global rank), sent to the other ``members``; ``order`` is its
    place in the load's global order, ``(set id, index in the set)``."""

    order: tuple[int, int]
    reader: int
    members: range | tuple[int, ...]
    parts: tuple[Part, ...]
    nbytes: int

    @property
    def receivers(self) -> tuple[int, ...]:
        return tuple(m for m in self.members if m != self.reader)

    def describe(self) -> str:
        names = sorted({p.box[0] for p in self.parts})
        shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
        return f"tensor(s) {shown} ({self.nbytes} bytes, shared read {self.order})"


def split_box(
    offsets: Sequence[int], lengths: Sequence[int], itemsize: int, max_bytes: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``offsets``/``lengths`` cut into C-order boxes of at most ``max_bytes`` (at least one
    element each): along the first dim whose trailing slab fits, enumerating the dims before."""
    offsets, lengths = tuple(offsets), tuple(lengths)
    if not lengths or math.prod(lengths) * itemsize <= max_bytes:
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
    share_set: ShareSet, boxes: Sequence[Box], itemsize: Callable[[str], int], message_bytes: int
) -> list[Message]:
    """The messages of one share set from its ``boxes`` (the same on every member): every box
    cut into parts of at most ``message_bytes``, each part dealt to the member dealt the fewest
    bytes so far (the lowest rank on ties), each member's parts packed in order into messages
    of at most ``message_bytes``, the members' messages taken in turn."""
    members = share_set.members
    # (bytes dealt, rank) of the members dealt something, and the rest in rank order: the next
    # part goes to the least of both (a heap, so dealing is O(log members) a part).
    dealt: list[tuple[int, int]] = []
    idle = iter(members)
    waiting = next(idle, None)
    mine: dict[int, list[tuple[Box, tuple[int, ...], tuple[int, ...], int]]] = {}
    for box in sorted(set(boxes)):
        size = itemsize(box[0])
        for offsets, lengths in split_box(box[1], box[2], size, message_bytes):
            nbytes = math.prod(lengths) * size
            if waiting is not None and (not dealt or (0, waiting) < dealt[0]):
                load, reader = 0, waiting
                waiting = next(idle, None)
            else:
                load, reader = heapq.heappop(dealt)
            heapq.heappush(dealt, (load + nbytes, reader))
            mine.setdefault(reader, []).append((box, offsets, lengths, nbytes))
    readers = sorted(mine)  # members with parts, in the set's order
    batches: dict[int, list[list[Part]]] = {m: [] for m in readers}
    for reader in readers:
        at = 0
        for box, offsets, lengths, nbytes in mine[reader]:
            if not batches[reader] or (at + nbytes > message_bytes and batches[reader][-1]):
                batches[reader].append([])
                at = 0
            batches[reader][-1].append(Part(box, offsets, lengths, nbytes, at))
            at += -(-nbytes // ALIGN) * ALIGN
    # Round-robin over the readers in the set's order: each member's k-th message comes before
    # anyone's (k+1)-th, so every member sends one while it receives the others' and all read
    # ahead at once. (Reader by reader, a member would hold its own reads until the members
    # before it had sent all theirs, and once those filled its memory bound it read no further.)
    messages: list[Message] = []
    for k in range(max((len(b) for b in batches.values()), default=0)):
        for reader in readers:
            if k < len(batches[reader]):
                batch = batches[reader][k]
                end = batch[-1].at + batch[-1].nbytes
                messages.append(Message((share_set.id, len(messages)), reader, members, tuple(batch), end))
    return messages


__all__ = [
    "Box",
    "Message",
    "Part",
    "ShareRequest",
    "ShareSet",
    "box_of",
    "plan_sharing",
    "set_messages",
    "split_box",
    "summarize",
]
