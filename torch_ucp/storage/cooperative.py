"""The reader's side of a load in which ranks cooperate: summarize what each rank needs, read
shared bytes once and pass them on, and check that what was loaded equals what was saved.

:class:`~torch_ucp.UCPReader` calls :func:`summarize` in ``prepare_local_plan`` (every rank),
:func:`~torch_ucp.storage.sharing.plan_sharing` in ``prepare_global_plan`` (the coordinator)
and :class:`CooperativeRead` in ``read_data`` (every rank). The collectives run on the reader's
process group (``UCPReader(process_group=...)``; default: the default group), which must be
the group ``dcp.load`` runs on: DCP does not hand its group to a storage reader.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError, CorruptCheckpointError
from torch_ucp.metadata import content_hash
from torch_ucp.metadata.catalog import Fragment, FragmentCatalog
from torch_ucp.storage.broadcast import PairTags, Transfer, TransferEngine
from torch_ucp.storage.reading import BoxRead, FragmentReader, ReadStats
from torch_ucp.storage.sharing import (
    Message,
    NeedSummary,
    ReadClasses,
    Row,
    ShareAssignment,
    canonical,
    rows_digest,
    set_messages,
    tree,
)
from torch_ucp.storage.store import Store

logger = logging.getLogger(__name__)

_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                        "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "9p", "afs", "wekafs")


def share_by_default(store: Store) -> bool:
    """``share_reads="auto"``: on for object stores and network filesystems (every replica's
    read crosses the network), off for local disks (on one host, the page cache already
    serves a second reader of the same bytes)."""
    if not store.is_local:
        return True
    return _mount_type(store.root) in _NETWORK_FILESYSTEMS


def _mount_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (``/proc/mounts``; "" if unknown)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ""
    path = os.path.realpath(path)
    best, kind = "", ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def transport_of(group: dist.ProcessGroup | None) -> str | None:
    """Where shared messages travel on ``group``: ``"cpu"`` (gloo), ``"cuda"`` (NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend:
        return "cpu"
    if "nccl" in backend and torch.cuda.is_available():
        return "cuda"
    return None


def row_of(item: ReadItem, catalog: FragmentCatalog) -> Row:
    """The stored box a tensor read item needs, in its tensor's global coordinates."""
    chunk = tuple(item.storage_index.offset)
    offsets = tuple(c + o for c, o in zip(chunk, item.storage_offsets))
    return Row(catalog.position[item.storage_index.fqn], offsets, tuple(item.lengths))


@dataclass
class LocalNeeds:
    """What :func:`summarize` keeps on the rank: each class's canonical rows."""

    classes: list[list[Row]] = field(default_factory=list)


def summarize(
    items: Sequence[ReadItem],
    labels: ReadClasses | None,
    catalog: FragmentCatalog,
    *,
    share: bool,
    verify: bool,
    group: dist.ProcessGroup | None,
) -> tuple[NeedSummary, LocalNeeds]:
    """This rank's :class:`NeedSummary` (for the coordinator) and :class:`LocalNeeds` (kept).
    Without ``labels`` (a planner other than UCPLoadPlanner) every tensor item is one class."""
    by_class: dict[int, set[Row]] = {}
    if share or verify:
        if labels is not None and len(labels.labels) != len(items):
            labels = None
        for i, item in enumerate(items):
            if item.type == LoadItemType.BYTE_IO:
                continue
            label = labels.labels[i] if labels is not None else 0
            if label >= 0:
                by_class.setdefault(label, set()).add(row_of(item, catalog))
    classes = [canonical(by_class[k]) for k in sorted(by_class)]
    itemsize = [e.dtype.itemsize for e in catalog.entries]
    summary = NeedSummary(
        rank=dist.get_rank(),
        group_size=dist.get_world_size(group),
        transport=transport_of(group),
        share=share,
        verify=verify,
        digests=b"".join(rows_digest(c) for c in classes),
        nbytes=np.array([sum(r.numel * itemsize[r.tensor] for r in c) for c in classes], dtype=np.int64),
    )
    return summary, LocalNeeds(classes)


def _narrow(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for d, (o, n) in enumerate(zip(offsets, lengths)):
        if o or n != t.shape[d]:
            t = t.narrow(d, o, n)
    return t


class CooperativeRead:
    """One rank's ``read_data`` of a load planned with :func:`plan_sharing`: shared rows through
    the transfer engine, the rest read locally, then (``verify``) the content hashes checked.

    Args:
        items: this rank's tensor read items (in plan order).
        planner: the load planner (``resolve_tensor`` / ``commit_tensor``).
        catalog / store: the checkpoint.
        new_reader: makes a :class:`FragmentReader` for the store.
        assignment / needs: the coordinator's answer and what :func:`summarize` kept (``None``:
            no collectives, e.g. a load in one process).
        group: the reader's process group.
        planner_lock: serializes ``commit_tensor`` with the local reads' callbacks.
    """

    def __init__(
        self,
        items: Sequence[ReadItem],
        planner: LoadPlanner,
        catalog: FragmentCatalog,
        store: Store,
        new_reader: Callable[[], FragmentReader],
        assignment: ShareAssignment | None,
        needs: LocalNeeds | None,
        group: dist.ProcessGroup | None,
        commit: Callable[[ReadItem], Callable[[torch.Tensor], None]],
    ) -> None:
        self.items = list(items)
        self.planner = planner
        self.catalog = catalog
        self.store = store
        self.new_reader = new_reader
        self.assignment = assignment
        self.needs = needs
        self.group = group
        self.commit = commit
        self.meta = catalog.meta
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.row_items: dict[Row, list[int]] = {}
        for i, item in enumerate(self.items):
            self.row_items.setdefault(row_of(item, catalog), []).append(i)
        self.stats = ReadStats()
        self._fragments: dict[Row, Fragment] = {}
        self._lock = threading.Lock()

    # -- which rows are shared, and with whom ---------------------------------------------------
    def _set_rows(self) -> list[tuple[Any, list[Row]]]:
        """``(share set, its canonical rows)`` for every set this rank is in."""
        if self.assignment is None or self.needs is None:
            return []
        out = []
        for s in sorted(self.assignment.sets, key=lambda s: s.id):
            rows = canonical(itertools.chain.from_iterable(self.needs.classes[c] for c in s.classes))
            out.append((s, rows))
        return out

    def _fragment(self, row: Row) -> Fragment:
        with self._lock:
            found = self._fragments.get(row)
        if found is None:
            from torch_ucp.storage.reader import lookup_fragment

            item = self.items[self.row_items[row][0]]
            found = lookup_fragment(self.catalog, item.storage_index, self.store.url)
            with self._lock:
                self._fragments[row] = found
        return found

    def _dtype(self, row: Row) -> torch.dtype:
        return self.catalog.entries[row.tensor].dtype

    # -- the run --------------------------------------------------------------------------------
    def run(self, before_local: Callable[[], None] | None = None) -> None:
        """Shared transfers, then local reads (and ``before_local``, e.g. values), then the
        ``verify_load`` check; every collective step is reached by every rank even after an
        error here, which is raised at the end."""
        error: BaseException | None = None
        sets = self._set_rows()
        shared: set[Row] = set()
        if self.assignment is not None and self.assignment.share:
            for _, rows in sets:
                shared.update(rows)
        try:
            if shared:
                self._run_transfers(sets)
        except Exception as e:  # noqa: BLE001 - raised after the verification step
            error = e
        if error is None:
            try:
                self._read_locally([r for r in self.row_items if r not in shared])
                if before_local is not None:
                    before_local()
            except Exception as e:  # noqa: BLE001
                error = e
        if self.assignment is not None and self.assignment.verify:
            self._verify(sets, failed=error is not None)
        elif self.assignment is None and self._verify_alone:
            if error is None:
                self._verify(sets, failed=False)
        if error is not None:
            raise error

    _verify_alone = False  # set by the reader for a verified load without collectives

    # -- local reads ----------------------------------------------------------------------------
    def _read_locally(self, rows: Sequence[Row]) -> None:
        reads = []
        for row in rows:
            fragment = self._fragment(row)
            for i in self.row_items[row]:
                item = self.items[i]
                reads.append(
                    BoxRead(
                        name=item.storage_index.fqn,
                        data=fragment.data,
                        dtype=self._dtype(row),
                        fragment_offsets=fragment.offsets,
                        fragment_shape=fragment.lengths,
                        offsets=tuple(item.storage_offsets),
                        lengths=tuple(item.lengths),
                        dest=self.planner.resolve_tensor(item).detach(),
                        on_done=self.commit(item),
                    )
                )
        if reads:
            self.stats.add(self.new_reader().read(reads))

    # -- shared reads ---------------------------------------------------------------------------
    def _run_transfers(self, sets: list[tuple[Any, list[Row]]]) -> None:
        assert self.assignment is not None
        a = self.assignment
        messages: list[tuple[Message, Any, list[Row]]] = []
        parts_left: dict[Row, int] = {}
        for s, rows in sets:
            itemsizes = [self._dtype(r).itemsize for r in rows]
            for m in set_messages(s.id, len(s.members), rows, itemsizes, a.message_bytes):
                messages.append((m, s, rows))
                for p in m.parts:
                    parts_left[rows[p.row]] = parts_left.get(rows[p.row], 0) + 1
        messages.sort(key=lambda x: x[0].order)
        tags = PairTags()
        trees: dict[tuple[int, int], tuple[dict[int, int], dict[int, list[int]]]] = {}
        transfers = []
        for m, s, rows in messages:
            me = s.members.index(self.rank)
            key = (s.id, m.reader)
            if key not in trees:
                trees[key] = tree(len(s.members), m.reader, a.fanout)
            parent_of, children_of = trees[key]
            parent = s.members[parent_of[me]] if me != m.reader else None
            recv_tag = tags.next(parent, self.rank) if parent is not None else -1
            children = tuple(s.members[c] for c in children_of[me])
            send_tags = tuple(tags.next(self.rank, c) for c in children)
            transfers.append(
                Transfer(
                    order=m.order,
                    nbytes=m.nbytes,
                    source=s.members[m.reader],
                    parent=parent,
                    children=children,
                    recv_tag=recv_tag,
                    send_tags=send_tags,
                    what=lambda m=m, rows=rows: self._describe(m, rows),
                    handle=(m, rows),
                )
            )
        device = torch.device("cpu") if a.share and _transport(self.group) == "cpu" else torch.device(
            "cuda", torch.cuda.current_device()
        )
        reader = self.new_reader()
        engine = TransferEngine(self.group, self.rank, device, knobs.share_inflight_bytes(), knobs.share_read_workers())

        def read(t: Transfer, host: torch.Tensor) -> None:
            m, rows = t.handle
            boxes = []
            for p in m.parts:
                row = rows[p.row]
                fragment = self._fragment(row)
                dtype = self._dtype(row)
                boxes.append(
                    BoxRead(
                        name=self.catalog.names[row.tensor],
                        data=fragment.data,
                        dtype=dtype,
                        fragment_offsets=fragment.offsets,
                        fragment_shape=fragment.lengths,
                        offsets=tuple(o - f for o, f in zip(p.offsets, fragment.offsets)),
                        lengths=p.lengths,
                        dest=host[p.at : p.at + p.nbytes].view(dtype).reshape(p.lengths),
                    )
                )
            stats = reader.read(boxes)
            with self._lock:
                self.stats.add(stats)

        def deliver(t: Transfer, payload: torch.Tensor) -> None:
            m, rows = t.handle
            for p in m.parts:
                row = rows[p.row]
                src = payload[p.at : p.at + p.nbytes].view(self._dtype(row)).reshape(p.lengths)
                rel = [o - r for o, r in zip(p.offsets, row.offsets)]
                for i in self.row_items[row]:
                    item = self.items[i]
                    _narrow(self.planner.resolve_tensor(item).detach(), rel, p.lengths).copy_(src)
                parts_left[row] -= 1
                if parts_left[row] == 0:
                    for i in self.row_items[row]:
                        item = self.items[i]
                        self.commit(item)(self.planner.resolve_tensor(item))
                self.stats.bytes_needed += p.nbytes * len(self.row_items[row])

        engine.run(transfers, read, deliver)
        self.stats.bytes_sent += engine.stats.bytes_sent
        self.stats.bytes_received += engine.stats.bytes_received

    def _describe(self, m: Message, rows: Sequence[Row]) -> str:
        names = sorted({self.catalog.names[rows[p.row].tensor] for p in m.parts})
        objects = set()
        for p in m.parts:
            try:
                objects.add(self.store.describe(self._fragment(rows[p.row]).data.object))
            except CheckpointError:
                pass
        shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
        return f"tensor {shown} (data object {', '.join(sorted(objects)) or '?'})"

    # -- verify_load ----------------------------------------------------------------------------
    def _verify(self, sets: list[tuple[Any, list[Row]]], failed: bool) -> None:
        """Add up the content hash of every loaded row (rows shared by a set: counted by its
        lowest rank only), over every rank, and compare with the header."""
        entries = self.catalog.entries
        ntensors = len(entries)
        sums = np.zeros((ntensors + 1, 3), dtype=np.int64)  # lo 32 bits, hi 32 bits, elements
        counted_elsewhere = {r for s, rows in sets if s.members[0] != self.rank for r in rows}
        skipped: set[int] = set()
        if not failed:
            for row, indices in self.row_items.items():
                if row in counted_elsewhere:
                    continue
                entry = entries[row.tensor]
                dest = self.planner.resolve_tensor(self.items[indices[0]]).detach()
                if dest.dtype != entry.dtype:
                    skipped.add(row.tensor)
                    continue
                h = content_hash.tensor_hash(dest, row.offsets, entry.shape)
                sums[row.tensor, 0] += h & 0xFFFFFFFF
                sums[row.tensor, 1] += h >> 32
                sums[row.tensor, 2] += row.numel
        sums[ntensors, 0] = int(failed)
        total = torch.from_numpy(sums)
        if self.assignment is not None:
            dist.all_reduce(total, group=self.group)
        if int(total[ntensors, 0]):
            return  # a rank failed to read: that rank raises its error
        total = total.numpy()
        wrong, partial = [], []
        for t, entry in enumerate(entries):
            count = int(total[t, 2])
            if entry.content_hash is None or count == 0:
                continue
            if count != entry.numel:
                partial.append(entry.fqn)
                continue
            got = (int(total[t, 0]) + (int(total[t, 1]) << 32)) & content_hash.MASK
            if got != entry.content_hash:
                wrong.append((entry.fqn, got, entry.content_hash))
        if partial or skipped:
            logger.warning(
                "torch_ucp verify_load: not checked (loaded in part, more than once, or into another "
                "dtype): %s", ", ".join(sorted(set(partial) | {entries[t].fqn for t in skipped}))[:2000],
            )
        if wrong:
            shown = "; ".join(f"{f!r}: {g:016x}, saved {e:016x}" for f, g, e in wrong[:10])
            raise CorruptCheckpointError(
                f"verify_load: what was loaded from {self.store.url} differs from what was saved "
                f"for {len(wrong)} tensor(s) (content hash of the loaded shards, saved value): "
                f"{shown}{' ...' if len(wrong) > 10 else ''}"
            )


def _transport(group: dist.ProcessGroup | None) -> str | None:
    return transport_of(group)


__all__ = ["CooperativeRead", "LocalNeeds", "row_of", "share_by_default", "summarize", "transport_of"]
