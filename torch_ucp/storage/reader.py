"""UCPReader: a DCP StorageReader that reads only the bytes each rank's plan needs."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future as Pending
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from torch_ucp.metadata.catalog import Fragment, FragmentCatalog
from torch_ucp.metadata.checksums import BlockGrid
from torch_ucp.metadata.dcp import CatalogStateDict, catalog_metadata
from torch_ucp.metadata.header import decode_metadata
from torch_ucp.metadata.placements import narrow
from torch_ucp.metadata.schema import METADATA_FILE, CheckpointMetadata, IndexRef, ValueEntry
from torch_ucp.metadata.values import decode_value
from torch_ucp.storage import stock_options
from torch_ucp.storage.content_check import (
    LoadedContent,
    VerifyPlan,
    VerifyRequest,
    check_plan,
    group_size,
    plan_verification,
)
from torch_ucp.storage.fragment_reader import BoxRead, FragmentReader, ReadStats, normalize_verify
from torch_ucp.storage.protocols import ValueLoadPlanner
from torch_ucp.storage.share_transfer import ShareTransfers, TransferStats
from torch_ucp.storage.sharing import (
    Box,
    Message,
    Part,
    ShareRequest,
    ShareSet,
    box_of,
    plan_sharing,
    set_messages,
    summarize,
)
from torch_ucp.storage.store import Store, open_store
from torch_ucp.storage.transfer_log import log_load


def new_load_id() -> str:
    """A load's id (a random UUID, like stock readers' ``load_id``)."""
    return str(uuid.uuid4())


def _read_header(store: Store) -> bytes:
    try:
        return store.read_bytes(
            METADATA_FILE, knobs.max_metadata_bytes(), limit_knob="TORCH_UCP_MAX_METADATA_BYTES"
        )
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {store.url}: {store.describe(METADATA_FILE)} is missing"
        ) from None


def open_catalog(store: Store, header: bytes | None = None) -> FragmentCatalog:
    """The checkpoint at ``store`` as a :class:`FragmentCatalog`: its header decoded (read now,
    unless given), its fragment indexes read from ``store`` when needed."""
    raw = _read_header(store) if header is None else header
    meta, rows = decode_metadata(raw, store.describe(METADATA_FILE), max_bytes=knobs.max_metadata_bytes())

    def fetch(refs: Sequence[IndexRef]) -> list[bytes]:
        try:
            return store.read_many([r.object for r in refs], [r.nbytes for r in refs])
        except FileNotFoundError:
            missing = [store.describe(r.object) for r in refs if not store.exists(r.object)]
            raise CorruptCheckpointError(f"fragment index {', '.join(missing)} is missing") from None

    return FragmentCatalog(meta, rows, fetch, store.url)


def load_metadata(store: Store) -> CheckpointMetadata:
    """Read and decode a checkpoint's header, with errors that name the URL."""
    return open_catalog(store).meta


def read_value_bytes(store: Store, entry: ValueEntry, meta: CheckpointMetadata, verify: bool) -> bytes:
    """The stored bytes of one non-tensor value, verified against its checksums (the data
    object's size is checked before memory is allocated for them)."""
    data = entry.data
    try:
        buf = store.read_range(data.object, data.byte_offset, data.byte_length)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"cannot read value {entry.fqn!r}: {e}") from e
    if verify and data.byte_length:
        if type(meta.checksum_block_bytes) is not int or meta.checksum_block_bytes < 1:
            raise CorruptCheckpointError(
                f"value {entry.fqn!r}: checksum block size {meta.checksum_block_bytes!r} is not a "
                "positive integer"
            )
        grid = BlockGrid.flat(data.byte_length, meta.checksum_block_bytes)
        if len(data.checksums) != grid.count:
            raise CorruptCheckpointError(
                f"value {entry.fqn!r}: the metadata lists {len(data.checksums)} checksums for its "
                f"{data.byte_length} bytes, {grid.count} expected; load with verify=False to "
                "read it unverified"
            )
        got = grid.checksums(memoryview(buf), meta.checksum_algorithm)
        for i, (have, expected) in enumerate(zip(got, data.checksums)):
            if have != expected:
                block = meta.checksum_block_bytes
                raise CorruptCheckpointError(
                    f"checksum mismatch in value {entry.fqn!r}: data object "
                    f"{store.describe(data.object)} bytes [{data.byte_offset + i * block}, "
                    f"{data.byte_offset + min((i + 1) * block, data.byte_length)})"
                )
    return buf


def read_value(
    store: Store,
    entry: ValueEntry,
    meta: CheckpointMetadata,
    verify: bool,
    *,
    allow_pickle: bool = False,
) -> Any:
    """Read, verify and decode one non-tensor value (``torch_save`` ones only with
    ``allow_pickle``)."""
    return decode_value(
        entry.encoding, read_value_bytes(store, entry, meta, verify), entry.fqn, allow_pickle=allow_pickle
    )


class CommittedStateDict(CatalogStateDict):
    """State-dict metadata of a checkpoint just committed (what ``dcp.save`` returns and DCP
    broadcasts to every rank): pickles as the header bytes plus the URL; fragment indexes are
    read only if a chunk list is asked for."""

    def __init__(self, store: Store, header: bytes) -> None:
        super().__init__(None)
        self._store, self._header = store, header
        self._lock = threading.Lock()

    def catalog(self) -> FragmentCatalog:
        with self._lock:
            if self._catalog is None:
                self._catalog = open_catalog(self._store, self._header)
            return self._catalog

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommittedStateDict, (self._store, self._header))


class UCPReader(StorageReader):
    """Reads torch_ucp checkpoints from a local path or any fsspec URL.

    ``read_metadata`` reads only the header; the fragment indexes a rank's target overlaps are
    read while planning (:class:`~torch_ucp.UCPLoadPlanner`). Reads are grouped per data
    object, nearby byte ranges coalesced and run in parallel, and only the bytes the plan needs
    are fetched (a rank needing a quarter of a fragment reads about a quarter). Checksums are
    verified on read (see ``verify``).

    Args:
        url: checkpoint folder (path or fsspec URL); may instead be passed as ``checkpoint_id``.
        verify: ``True`` (default): every byte delivered is verified (reads are widened to the
            checksum blocks around them, small in both directions); ``False`` skips checks.
            Metadata (header and fragment indexes) is always verified.
        threads: parallel range reads per rank.
        allow_pickle: decode values stored with ``torch.save`` (unpickling runs code named by
            the checkpoint: only for checkpoints you trust). Default: such a value raises
            :class:`~torch_ucp.errors.UnsafeCheckpointError` naming its key.
        follow_symlinks: local/NFS: read data and metadata objects that are symbolic links
            (default: refused, so a checkpoint cannot make the reader read files outside it).
        verify_load: after reading, check that every loaded tensor's content equals what was
            saved, whatever the layouts (the sum of the loaded shards' content hashes, over
            every rank, against the header's; :mod:`torch_ucp.storage.content_check`). Raises
            :class:`~torch_ucp.errors.ContentMismatchError` naming the tensors. Every rank must
            pass it. Checkpoints saved without content hashes load with a warning.
        share_reads: ranks that need the same bytes (HSDP / DP replicas, replicated tensors)
            read each of them from storage once and send it to the others over the process
            group, overlapped and within ``TORCH_UCP_SHARE_INFLIGHT_BYTES`` of buffers
            (:mod:`torch_ucp.storage.sharing`). Default (``None``): ``TORCH_UCP_SHARE_READS``
            (``2``, its default: on for object stores over a gloo group; ``1``: everywhere,
            NCCL groups too; ``0``: off). Used only where every rank asks for it and the
            process group is the one ``dcp.load`` runs on (gloo or NCCL).
        process_group: the process group ``dcp.load`` runs on (default: the default group);
            ``verify_load`` and ``share_reads`` communicate on it.
        **storage_options: passed to fsspec.

    After a load, ``stats`` holds the bytes read and needed by this rank, and
    ``transfer_stats`` the bytes of shared reads it sent and received. ``load_id`` identifies
    the load (a new one on every ``reset``), as with stock readers; ``read_metadata`` puts it in
    ``Metadata.storage_meta.load_id`` beside the checkpoint's ``save_id``.
    """

    def __init__(
        self,
        url: str | os.PathLike | None = None,
        *,
        verify: bool | str = True,
        threads: int | None = None,
        allow_pickle: bool = False,
        follow_symlinks: bool = False,
        verify_load: bool = False,
        share_reads: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        if share_reads is not None and not isinstance(share_reads, bool):
            raise TypeError(f"UCPReader: share_reads must be True, False or None, got {share_reads!r}")
        self.share_reads = share_reads
        if not isinstance(verify_load, bool):
            raise TypeError(f"UCPReader: verify_load must be True or False, got {verify_load!r}")
        self.verify_load = verify_load
        self.process_group = process_group
        stock_options.check_reader_options(storage_options)
        self.storage_options = storage_options
        self.follow_symlinks = bool(follow_symlinks)
        self.store = self._store(url) if url is not None else None
        self.verify = normalize_verify(verify)
        self.allow_pickle = bool(allow_pickle)
        self.threads = threads
        self.stats = ReadStats()
        self.transfer_stats = TransferStats()
        self._stats_lock = threading.Lock()
        self._catalog: FragmentCatalog | None = None
        self.load_id = new_load_id()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_catalog"] = None
        state["process_group"] = None  # a process group does not travel (the default one does)
        del state["_stats_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stats_lock = threading.Lock()

    @property
    def checkpoint_id(self) -> str | None:
        return self.store.url if self.store is not None else None

    def _store(self, url: str | os.PathLike) -> Store:
        return open_store(url, self.storage_options, follow_symlinks=self.follow_symlinks)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.store = self._store(checkpoint_id)
        self._catalog = None
        self.stats = ReadStats()
        self.transfer_stats = TransferStats()
        self.load_id = new_load_id()

    def catalog(self) -> FragmentCatalog:
        """The checkpoint's catalog (header read once per reader; indexes as needed)."""
        if self.store is None:
            raise CheckpointError("UCPReader needs a URL: UCPReader(url) or dcp.load(checkpoint_id=)")
        if self._catalog is None:
            self._catalog = open_catalog(self.store)
        return self._catalog

    def checkpoint_metadata(self) -> CheckpointMetadata:
        """The decoded header."""
        return self.catalog().meta

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        catalog = self.catalog()
        assert self.store is not None
        metadata = catalog_metadata(catalog, self.store.url)
        metadata.storage_meta.load_id = self.load_id  # as stock readers set it
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, FragmentCatalog):
            self._catalog = metadata.storage_data
        self._started = time.monotonic()  # for the INFO line of the load (transfer_log)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        verify = VerifyRequest(True, group_size(self.process_group)) if self.verify_load else None
        share = self._share_request(plan)
        if verify is None and share is None:
            return plan
        return dataclasses.replace(plan, storage_data=_LocalRequest(verify, share))

    def _share_request(self, plan: LoadPlan) -> ShareRequest | None:
        assert self.store is not None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        transport = _transport(self.process_group)
        wanted = share_by_default(self.store, transport) if self.share_reads is None else self.share_reads
        if not wanted or transport is None:
            return None
        position = self.catalog().position
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        members = frozenset(dist.get_process_group_ranks(group))
        # targets sharded over a mesh of exactly this group's ranks: nobody else needs their boxes
        # (a mesh of fewer ranks may have replicas outside it, as DDP x TP has)
        unreplicated = {fqn for fqn, ranks in getattr(plan.items, "unreplicated", {}).items() if ranks == members}
        return summarize(dist.get_rank(), dist.get_world_size(self.process_group), plan.items, position, unreplicated)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        requests = [p.storage_data if isinstance(p.storage_data, _LocalRequest) else _LocalRequest(None, None)
                    for p in plans]
        verification = plan_verification([r.verify for r in requests])
        sets = plan_sharing([r.share for r in requests], len(plans))
        if not verification.verify_load and sets is None:
            return [dataclasses.replace(p, storage_data=None) for p in plans]
        verify = verification if verification.verify_load else None
        message_bytes = knobs.share_message_bytes()  # the coordinator's: every member must agree
        return [
            dataclasses.replace(p, storage_data=_ReaderPlan(verify, sets[i] if sets else None, message_bytes))
            for i, p in enumerate(plans)
        ]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        coordinated = plan.storage_data if isinstance(plan.storage_data, _ReaderPlan) else _ReaderPlan(None, None, 0)
        verification = check_plan(coordinated.verify)
        catalog = self.catalog()
        assert self.store is not None
        schedule = self._messages(plan, catalog, coordinated) if coordinated.share else []
        if verification is None:
            self._read(plan, planner, catalog, None, schedule)
        else:  # every rank reaches the check's collective, even after its reads failed
            loaded = LoadedContent(catalog)
            try:
                self._read(plan, planner, catalog, loaded, schedule)
            except BaseException:
                loaded.check(verification, self.process_group, failed=True, url=self.store.url)
                raise
            loaded.check(verification, self.process_group, failed=False, url=self.store.url)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _messages(self, plan: LoadPlan, catalog: FragmentCatalog, coordinated: _ReaderPlan) -> list[Message]:
        """This rank's shared messages: those of every share set it is in, from its own boxes
        (the same on every member of a set)."""
        assert coordinated.share is not None
        meta = catalog.meta
        boxes: dict[int, list[Box]] = {}
        for item in plan.items:
            if item.type != LoadItemType.BYTE_IO:
                boxes.setdefault(catalog.position[item.storage_index.fqn], []).append(box_of(item))
        messages = []
        for share_set in coordinated.share:
            mine = [b for t in sorted(share_set.tensors) for b in boxes.get(t, [])]
            messages += set_messages(share_set, mine, lambda fqn: meta.tensors[fqn].dtype.itemsize,
                                     coordinated.message_bytes)
        return messages

    def _read(
        self,
        plan: LoadPlan,
        planner: LoadPlanner,
        catalog: FragmentCatalog,
        loaded: LoadedContent | None,
        schedule: list[Message],
    ) -> None:
        """Read every item of ``plan`` into ``planner``'s targets (and count them in
        ``loaded``): the boxes of ``schedule`` through shared reads, the rest directly, values
        last. A rank with shared messages runs all of them even when something else failed
        first (others wait for them), then raises the first error."""
        meta = catalog.meta
        assert self.store is not None
        planner_lock = threading.Lock()
        shared_boxes = {p.box for m in schedule for p in m.parts}
        shared: dict[Box, list[tuple[ReadItem, torch.Tensor]]] = {}
        reads: list[BoxRead] = []
        values: list[ReadItem] = []
        error: BaseException | None = None
        try:
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    values.append(item)
                    continue
                box = box_of(item)
                if box in shared_boxes:
                    shared.setdefault(box, []).append((item, planner.resolve_tensor(item).detach()))
                    continue
                fragment = _fragment(catalog, item.storage_index, self.store.url)
                reads.append(
                    BoxRead(
                        name=item.storage_index.fqn,
                        data=fragment.data,
                        dtype=meta.tensors[item.storage_index.fqn].dtype,
                        fragment_offsets=fragment.offsets,
                        fragment_shape=fragment.lengths,
                        offsets=tuple(item.storage_offsets),
                        lengths=tuple(item.lengths),
                        dest=planner.resolve_tensor(item).detach(),
                        on_done=commit_callback(planner, item, planner_lock, loaded),
                    )
                )
        except Exception as e:  # noqa: BLE001 - raised after the shared reads ran
            error = e
        if not schedule:  # nothing shared: this rank reads everything itself
            if error is None and reads:
                self._read_boxes(reads, meta)
        else:
            local: Pending[None] | None = None
            pool = ThreadPoolExecutor(1, thread_name_prefix="ucp-local-reads")
            try:
                if error is None and reads:  # overlapped with the shared reads
                    local = pool.submit(self._read_boxes, reads, meta)
                try:
                    self._read_shared(schedule, shared, catalog, planner, planner_lock, loaded, error)
                except Exception as e:  # noqa: BLE001
                    error = error or e
                if local is not None:
                    try:
                        local.result()
                    except Exception as e:  # noqa: BLE001
                        error = error or e
            finally:
                pool.shutdown(wait=True)
        if error is not None:
            raise error
        for item in values:
            entry = meta.values.get(item.storage_index.fqn)
            if entry is None:
                raise CheckpointError(f"{item.storage_index.fqn}: no such value in {self.store.url}")
            self._load_value(item, entry, meta, planner)
        log_load(self.store.url, meta.save_id, self.stats.bytes_read, getattr(self, "_started", None))

    def _read_boxes(self, reads: list[BoxRead], meta: CheckpointMetadata, *, for_targets: bool = True) -> None:
        """Read ``reads`` (and count them in ``stats``: their bytes needed only when they are
        this rank's targets, not a shared message's buffer)."""
        assert self.store is not None
        reader = FragmentReader.for_checkpoint(self.store, meta, verify=self.verify, threads=self.threads)
        stats = reader.read(reads)
        if not for_targets:
            stats = dataclasses.replace(stats, bytes_needed=0)
        with self._stats_lock:
            self.stats.add(stats)

    def _read_shared(
        self,
        schedule: list[Message],
        targets: dict[Box, list[tuple[ReadItem, torch.Tensor]]],
        catalog: FragmentCatalog,
        planner: LoadPlanner,
        planner_lock: threading.Lock,
        loaded: LoadedContent | None,
        failed: BaseException | None,
    ) -> None:
        """Run this rank's shared messages: read the ones it reads, receive the others, copy
        every part into the targets needing its box and commit a box once all its parts are
        in. ``failed``: this rank failed already; its messages are sent marked failed."""
        assert self.store is not None
        meta = catalog.meta
        url = self.store.url
        parts_left: dict[Box, int] = {}
        for m in schedule:
            for p in m.parts:
                parts_left[p.box] = parts_left.get(p.box, 0) + 1

        def read(m: Message, payload: torch.Tensor) -> None:
            if failed is not None:
                raise CheckpointError(f"this rank failed before reading: {failed}")
            boxes = []
            for p in m.parts:
                item = targets[p.box][0][0]
                fragment = _fragment(catalog, item.storage_index, url)
                dtype = meta.tensors[p.box[0]].dtype
                boxes.append(BoxRead(
                    name=p.box[0],
                    data=fragment.data,
                    dtype=dtype,
                    fragment_offsets=fragment.offsets,
                    fragment_shape=fragment.lengths,
                    offsets=tuple(o - f for o, f in zip(p.offsets, fragment.offsets)),
                    lengths=p.lengths,
                    dest=payload[p.at : p.at + p.nbytes].view(dtype).reshape(p.lengths),
                ))
            self._read_boxes(boxes, meta, for_targets=False)

        def regions(p: Part) -> list[torch.Tensor]:
            """Where part ``p`` goes in each target of its box."""
            rel = [o - b for o, b in zip(p.offsets, p.box[1])]
            return [narrow(dest, rel, p.lengths) for _, dest in targets[p.box]]

        def in_place(m: Message) -> torch.Tensor | None:
            """A one-part message whose region (in its box's first target) is contiguous, on the
            CPU, of the saved dtype: it is read, sent and received there (no buffer, no copy)."""
            if len(m.parts) != 1:
                return None
            home = regions(m.parts[0])[0]
            if home.device.type != "cpu" or home.dtype != meta.tensors[m.parts[0].box[0]].dtype or not home.is_contiguous():
                return None
            return home.reshape(-1).view(torch.uint8)

        def deliver(m: Message, payload: torch.Tensor) -> None:
            if failed is not None:
                return
            for p in m.parts:
                src = payload[p.at : p.at + p.nbytes].view(meta.tensors[p.box[0]].dtype).reshape(p.lengths)
                for dest in regions(p):
                    if not _same_memory(dest, src):  # an in-place payload is already there
                        dest.copy_(src)
                with self._stats_lock:
                    self.stats.bytes_needed += p.nbytes * len(targets[p.box])
                parts_left[p.box] -= 1
                if parts_left[p.box] == 0:
                    for item, dest in targets[p.box]:
                        commit_callback(planner, item, planner_lock, loaded)(dest)

        group = self.process_group
        transport = _transport(group)
        device = torch.device("cpu") if transport == "cpu" else torch.device("cuda", torch.cuda.current_device())
        engine = ShareTransfers(dist.get_rank(), group, device, knobs.share_inflight_bytes(), knobs.share_read_workers())
        try:
            engine.run(schedule, read, deliver, in_place)
        finally:
            with self._stats_lock:
                self.transfer_stats.bytes_sent += engine.stats.bytes_sent
                self.transfer_stats.bytes_received += engine.stats.bytes_received
                self.transfer_stats.messages += engine.stats.messages
                self.transfer_stats.messages_in_place += engine.stats.messages_in_place

    def _load_value(
        self, item: ReadItem, entry: ValueEntry, meta: CheckpointMetadata, planner: LoadPlanner
    ) -> None:
        assert self.store is not None
        value = read_value(self.store, entry, meta, self.verify, allow_pickle=self.allow_pickle)
        if isinstance(planner, ValueLoadPlanner):
            planner.load_value(item, value)
            return
        buf = io.BytesIO()
        torch.save(value, buf)
        buf.seek(0)
        planner.load_bytes(item, buf)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


@dataclasses.dataclass(frozen=True)
class _LocalRequest:
    """One rank's ``LoadPlan.storage_data`` for the coordinator."""

    verify: VerifyRequest | None
    share: ShareRequest | None


@dataclasses.dataclass(frozen=True)
class _ReaderPlan:
    """The coordinator's answer to one rank (``LoadPlan.storage_data``)."""

    verify: VerifyPlan | None
    share: list[ShareSet] | None  # the share sets this rank is in
    message_bytes: int


def share_by_default(store: Store, transport: str | None) -> bool:
    """``share_reads=None``: as ``TORCH_UCP_SHARE_READS`` says. Its default, ``2``, shares where
    it was measured faster: object stores (not local disks and NFS) over a CPU (gloo) group.
    Over NCCL (``transport="cuda"``) only ``1`` turns it on: that path has not been measured."""
    setting = knobs.share_reads()
    if setting == knobs.SHARE_AUTO:
        return not store.posix and transport == "cpu"
    return setting == 1


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same elements of the same memory."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _transport(group: dist.ProcessGroup | None) -> str | None:
    """Where shared messages travel on ``group``: ``"cpu"`` (gloo), ``"cuda"`` (NCCL), or
    ``None`` (another backend: no sharing)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend:
        return "cpu"
    if "nccl" in backend and torch.cuda.is_available():
        return "cuda"
    return None


def _fragment(catalog: FragmentCatalog, index: MetadataIndex, url: str) -> Fragment:
    """The fragment a read item names: ``index.index`` is its row when the item came from
    :class:`~torch_ucp.UCPLoadPlanner`; otherwise it is looked up by tensor and offsets."""
    fqn, offsets = index.fqn, tuple(index.offset)
    if fqn not in catalog.position:
        raise CheckpointError(f"{fqn}: not a tensor of {url}")
    row = index.index
    if row is not None and 0 <= row < len(catalog.rows):
        fragment = catalog.fragment(row)
        if catalog.names[int(catalog.rows.tensor[row])] == fqn and fragment.offsets == offsets:
            return fragment
    entry = catalog.entry(fqn)
    catalog.require([(fqn, offsets, (1,) * len(entry.shape))])
    for r in catalog.overlapping(fqn, offsets, (1,) * len(entry.shape)):
        fragment = catalog.fragment(int(r))
        if fragment.offsets == offsets:
            return fragment
    raise CheckpointError(f"{fqn}: no fragment at offsets {list(offsets)} in {url}")


def commit_callback(
    planner: LoadPlanner, item: ReadItem, lock: threading.Lock, loaded: LoadedContent | None = None
):
    """``BoxRead.on_done`` calling ``planner.commit_tensor`` (serialized: planners need not be
    thread-safe), after counting the box as delivered in ``loaded`` (``verify_load``; in the
    reader's thread, in parallel)."""
    def commit(tensor: torch.Tensor) -> None:
        if loaded is not None:
            box = [c + o for c, o in zip(item.storage_index.offset, item.storage_offsets)]
            loaded.add(item.storage_index.fqn, box, tensor)
        with lock:
            planner.commit_tensor(item, tensor)

    return commit
