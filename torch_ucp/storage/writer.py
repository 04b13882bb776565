"""UCPWriter: a DCP StorageWriter streaming fragments as raw bytes to any fsspec URL."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError, CommitConflictError, UnsafeCheckpointError
from torch_ucp.metadata.checksums import DEFAULT_ALGORITHM, BlockGrid, crc32c
from torch_ucp.metadata.content_hash import PartialHashes, bytes_hash
from torch_ucp.metadata.content_hash import add as add_hashes
from torch_ucp.metadata.dcp import layout_from_dcp, write_item_nbytes
from torch_ucp.metadata.fragments import FragmentRows, tensor_key
from torch_ucp.metadata.header import encode_header
from torch_ucp.metadata.index import encode_index
from torch_ucp.metadata.provenance import PlannerData
from torch_ucp.metadata.raw_bytes import tensor_bytes
from torch_ucp.metadata.schema import (
    DATA_PREFIX,
    ITEM_ALIGNMENT,
    CheckpointMetadata,
    IndexRef,
    SaveLayout,
    StoredBytes,
    ValueEntry,
    data_object_name,
    index_object_name,
)
from torch_ucp.metadata.values import TORCH_SAVE, encode_value
from torch_ucp.storage import commit, stock_options
from torch_ucp.storage.commit import new_save_id
from torch_ucp.storage.objects import ObjectStream
from torch_ucp.storage.protocols import ValueSavePlanner
from torch_ucp.storage.store import Store, open_store
from torch_ucp.storage.transfer_log import log_save

logger = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - every torch platform today
    raise ImportError("torch_ucp stores raw little-endian bytes and needs a little-endian host")

RANK_RESULT = "__torch_ucp_rank__"
"""``WriteResult.index.fqn`` of the one result each rank reports (:class:`RankWritten`)."""


@dataclass(frozen=True)
class _RankAssignment:
    """What the coordinator tells each rank in ``SavePlan.storage_data``."""

    save_id: str
    rank: int


@dataclass
class RankWritten:
    """What one rank reports to the coordinator after writing (DCP gathers it): its fragment
    index, the values it wrote and the content hashes of the tensors it wrote fragments of. No
    per-fragment object crosses the wire."""

    rank: int
    index: IndexRef | None
    values: list[ValueEntry] = field(default_factory=list)
    bytes_written: int = 0
    objects: dict[str, int] = field(default_factory=dict)  # every object written -> its size
    hashes: PartialHashes | None = None  # None: this rank computed none


_Written = tuple[WriteItem, StoredBytes, "str | None", "int | None"]
"""Per written item: where its bytes went, its value encoding (values), its partial content
hash (tensors, when hashed)."""




def _balance(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Spread items over ``bins`` data objects by bytes (largest first), keeping plan order
    inside each object."""
    order = sorted(range(len(items)), key=lambda i: -write_item_nbytes(items[i]))
    load = [0] * bins
    owner = [0] * len(items)
    for i in order:
        b = min(range(bins), key=load.__getitem__)
        owner[i] = b
        load[b] += write_item_nbytes(items[i])
    out: list[list[WriteItem]] = [[] for _ in range(bins)]
    for i, item in enumerate(items):
        out[owner[i]].append(item)
    return [b for b in out if b]


class UCPWriter(StorageWriter):
    """Writes a torch_ucp checkpoint to a local path or any fsspec URL.

    Each rank streams its fragments into a few large data objects (one per writer thread) under
    ``data-<save_id>/``, computing block checksums on the way, then writes its fragment index
    there; the coordinator then commits by writing the header ``.metadata`` last, atomically
    and conditionally (:mod:`torch_ucp.storage.commit`: of concurrent saves to one URL at most
    one commits), and removes data of saves that can no longer commit, and nothing else. A save
    that fails on any rank commits nothing and removes its own data; a committed checkpoint at
    the URL stays loadable until the new one commits.

    Args:
        url: checkpoint folder: a path or fsspec URL (``s3://bucket/run/step-100``). May be
            given later as ``checkpoint_id`` to ``dcp.save``.
        overwrite: allow replacing a committed checkpoint at the same URL (checked when the
            save starts and again, atomically, when it commits).
        threads: writer threads (= data objects, = uploads in flight) per rank; default 2 on
            local disk (``TORCH_UCP_WRITE_THREADS``), 8 on object stores
            (``TORCH_UCP_REMOTE_WRITE_THREADS``).
        checksum_block_bytes: bytes per checksum block (64 KiB, ``TORCH_UCP_CHECKSUM_BLOCK_BYTES``).
        checksum_block_width: bytes of a row per block (2 KiB, ``TORCH_UCP_CHECKSUM_BLOCK_WIDTH``;
            see :class:`~torch_ucp.metadata.checksums.BlockGrid`).
        allow_pickle: store values that have no pickle-free encoding with ``torch.save``
            (default: refuse them, naming the key and the type). Loading them then needs
            ``allow_pickle=True`` too.
        content_hash: record each tensor's layout-independent content hash in the header
            (:mod:`torch_ucp.metadata.content_hash`; checked by ``verify_load=True`` and
            ``torch-ucp verify --logical``). Default on (``TORCH_UCP_CONTENT_HASH``).
        **storage_options: passed to fsspec (``endpoint_url=``, ``key=``, ``anon=`` ...), except
            stock ``FileSystemWriter`` options (``thread_count``, ``sync_files`` ...), which are
            honoured or refused with what to use instead (:mod:`~torch_ucp.storage.stock_options`).
    """

    def __init__(
        self,
        url: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        threads: int | None = None,
        checksum_block_bytes: int | None = None,
        checksum_block_width: int | None = None,
        allow_pickle: bool = False,
        content_hash: bool | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        threads = stock_options.writer_threads(storage_options, threads)
        _check_flag("overwrite", overwrite)
        _check_flag("allow_pickle", allow_pickle)
        content_hash = knobs.content_hash() if content_hash is None else content_hash
        _check_flag("content_hash", content_hash)
        if threads is not None:
            _check_int("threads", threads, 1, 1024)
        block_bytes = _check_int(
            "checksum_block_bytes",
            knobs.checksum_block_bytes() if checksum_block_bytes is None else checksum_block_bytes,
            MIN_BLOCK_BYTES, 1 << 30, multiple=ITEM_SIZE_MAX,
        )
        block_width = _check_int(
            "checksum_block_width",
            knobs.checksum_block_width() if checksum_block_width is None else checksum_block_width,
            ITEM_SIZE_MAX, block_bytes, multiple=ITEM_SIZE_MAX,
        )
        self.storage_options = storage_options
        self.store = open_store(url, storage_options) if url is not None else None
        self.overwrite = overwrite
        self.allow_pickle = allow_pickle
        self.content_hash = content_hash
        self._threads = threads
        self.checksum_block_bytes = block_bytes
        self.checksum_block_width = block_width
        self.checksum_algorithm = DEFAULT_ALGORITHM
        self.is_coordinator = False
        self._stock_writers: dict[str, set[int]] = {}
        self.save_id: str | None = None
        self.bytes_written = 0
        self.metadata: CheckpointMetadata | None = None  # the coordinator's, after a commit

    @property
    def threads(self) -> int:
        """Writer threads (= data objects) per rank: 2 on local disk, 8 on object stores."""
        if self._threads:
            return self._threads
        return self.store.default_write_threads if self.store is not None else knobs.write_threads()

    @property
    def url(self) -> str | None:
        return self.store.url if self.store is not None else None

    @property
    def checkpoint_id(self) -> str | None:
        return self.url

    # -- StorageWriter protocol ---------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.store = open_store(checkpoint_id, self.storage_options)
        self.save_id = None
        self.bytes_written = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.store is None:
            raise CheckpointError("UCPWriter needs a URL: UCPWriter(url) or dcp.save(checkpoint_id=)")
        self.is_coordinator = is_coordinator
        self._started = time.monotonic()  # for the INFO line of the save (transfer_log)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        assert self.store is not None
        save_id = new_save_id()
        commit.begin(self.store, save_id, overwrite=self.overwrite)  # refuses early, marks the folder
        self.save_id = save_id
        # plans of a stock planner carry their items: note who writes each tensor (the header
        # records it; UCPSavePlanner's layout says it itself)
        self._stock_writers: dict[str, set[int]] = {}
        for rank, plan in enumerate(plans):
            for item in plan.items:
                if item.type != WriteItemType.BYTE_IO:
                    self._stock_writers.setdefault(item.index.fqn, set()).add(rank)
        return [
            dataclasses.replace(plan, storage_data=_RankAssignment(save_id, rank))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        assert self.store is not None
        assignment: _RankAssignment = plan.storage_data
        self.save_id = assignment.save_id
        rank = assignment.rank
        folder = f"{DATA_PREFIX}{assignment.save_id}"
        bins = _balance(list(plan.items), max(1, min(self.threads, len(plan.items))))

        def write_object(k: int, items: list[WriteItem]) -> list[_Written]:
            rel = data_object_name(assignment.save_id, rank, k)
            return self.store.retrying(
                lambda: self._write_object(rel, items, planner),
                f"writing {self.store.describe(rel)}",
            )

        with self._removed_on_failure(assignment.save_id):
            self.store.makedirs(folder)
            if len(bins) <= 1:
                written = [r for k, b in enumerate(bins) for r in write_object(k, b)]
            else:
                with ThreadPoolExecutor(len(bins), "ucp-write") as pool:
                    futures = [pool.submit(write_object, k, b) for k, b in enumerate(bins)]
                    written = [r for f in futures for r in f.result()]
            report = RankWritten(rank, None)
            tensors = []
            hashes: dict[str, int] = {}
            for item, stored, encoding, digest in written:
                end = stored.byte_offset + stored.byte_length
                report.objects[stored.object] = max(report.objects.get(stored.object, 0), end)
                if encoding is not None:
                    report.values.append(ValueEntry(item.index.fqn, encoding, stored, rank))
                else:
                    chunk = item.tensor_data.chunk
                    tensors.append((item.index.fqn, chunk.offsets, chunk.sizes, stored))
                    if digest is not None:
                        hashes[item.index.fqn] = add_hashes(hashes.get(item.index.fqn, 0), digest)
            if self.content_hash:
                report.hashes = PartialHashes.of(hashes)
            if tensors:
                keys, rows = index_rows(tensors, rank)
                blob = encode_index(rank, keys, rows, self.checksum_block_bytes, self.checksum_block_width)
                name = index_object_name(assignment.save_id, rank)
                self.store.retrying(lambda: self.store.write_object(name, blob), f"writing {self.store.describe(name)}")
                report.index = IndexRef(rank, name, len(blob), crc32c(blob), len(rows))
                report.objects[name] = len(blob)
            if bins:
                self.store.fsync_dir(folder)
        report.bytes_written = self.bytes_written = sum(w[1].byte_length for w in written)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([WriteResult(MetadataIndex(RANK_RESULT), report.bytes_written, report)])
        return fut

    def _write_object(self, rel: str, items: list[WriteItem], planner: SavePlanner) -> list[_Written]:
        """Stream ``items`` into one data object; on failure abort it (retries rewrite it).
        Returns, per item, where its bytes went, (values) their encoding and (tensors, with
        ``content_hash``) the fragment's partial content hash."""
        assert self.store is not None
        results = []
        stream = ObjectStream(self.store, rel, ITEM_ALIGNMENT)
        try:
            for item in items:
                data, encoding, grid = self._item_bytes(item, planner)
                stored = stream.append(data, grid, self.checksum_algorithm)
                digest = None
                if self.content_hash and encoding is None:
                    td = item.tensor_data
                    digest = bytes_hash(data, td.properties.dtype.itemsize, td.chunk.offsets, td.chunk.sizes, td.size)
                results.append((item, stored, encoding, digest))
            stream.close()
        except BaseException:
            stream.abort()
            raise
        return results

    def block_grid(self, shape: tuple[int, ...], itemsize: int) -> BlockGrid:
        """The checksum blocks of a fragment of this shape and element size (flat for values:
        ``shape=(nbytes,)``, ``itemsize=1``)."""
        return BlockGrid.for_fragment(shape, itemsize, self.checksum_block_bytes, self.checksum_block_width)

    def _item_bytes(
        self, item: WriteItem, planner: SavePlanner
    ) -> tuple[memoryview, str | None, BlockGrid]:
        if item.type != WriteItemType.BYTE_IO:
            tensor = planner.resolve_data(item)
            return tensor_bytes(tensor), None, self.block_grid(tuple(tensor.shape), tensor.dtype.itemsize)
        name = item.index.fqn
        if isinstance(planner, ValueSavePlanner):
            encoding, payload = encode_value(planner.resolve_value(item), name=name, allow_pickle=self.allow_pickle)
        else:  # a stock planner hands over torch.save bytes: re-encode them without pickle
            encoding, payload = _reencode_stock_bytes(planner.resolve_data(item), name, self.allow_pickle)
        return memoryview(payload), encoding, self.block_grid((len(payload),), 1)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: write the header (``.metadata``) last and atomically, remove data of other
        saves, and leave DCP a compact ``metadata`` to broadcast to every rank."""
        assert self.store is not None
        reports = [r.storage_data for rank_results in results for r in rank_results]
        if not all(isinstance(r, RankWritten) for r in reports):
            raise CheckpointError("UCPWriter.finish got write results from another storage writer")
        if isinstance(metadata.planner_data, PlannerData):
            layout = metadata.planner_data.layout
        else:  # a stock planner: every tensor's writers were recorded by prepare_global_plan
            layout = layout_from_dcp(metadata, self._stock_writers)
        assert self.save_id is not None, "prepare_global_plan runs on the coordinator first"
        with self._removed_on_failure(self.save_id):
            meta = checkpoint_metadata(
                layout,
                reports,
                save_id=self.save_id,
                world_size=len(results),
                checksum_algorithm=self.checksum_algorithm,
                checksum_block_bytes=self.checksum_block_bytes,
                checksum_block_width=self.checksum_block_width,
            )
            objects = {name: size for r in reports for name, size in r.objects.items()}
            header = encode_header(meta)
            commit.publish(self.store, meta.save_id, header, overwrite=self.overwrite, objects=objects)
        self.metadata = meta
        commit.remove_stale(self.store, meta.save_id)
        compact_broadcast(metadata, meta, header, self.store)
        log_save(self.store.url, meta.save_id, results, getattr(self, "_started", None))

    @contextlib.contextmanager
    def _removed_on_failure(self, save_id: str) -> Iterator[None]:
        """On a failure, remove this save's own data before raising; a failure because a
        concurrent save removed that data is raised as :class:`CommitConflictError`."""
        assert self.store is not None
        try:
            yield
        except BaseException as e:
            concurrent = not isinstance(e, CheckpointError) and not isinstance(
                commit.read_marker(self.store, save_id), dict
            )
            commit.discard(self.store, save_id)
            if concurrent:
                raise CommitConflictError(
                    f"save {save_id} to {self.store.url} failed: its data folder was removed while "
                    f"it ran (by a concurrent save that committed there, or by hand): {e}"
                ) from e
            raise

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.url, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def index_rows(
    fragments: Sequence[tuple[str, Sequence[int], Sequence[int], StoredBytes]], rank: int
) -> tuple[np.ndarray, FragmentRows]:
    """The fragment-index rows of ``(fqn, offsets, lengths, stored)`` fragments a rank wrote,
    and their tensor keys."""
    n = len(fragments)
    ndim = max((len(o) for _, o, _, _ in fragments), default=0)
    offsets = np.zeros((n, ndim), dtype=np.int64)
    lengths = np.ones((n, ndim), dtype=np.int64)
    names: dict[str, int] = {}
    obj = np.empty(n, dtype=np.int32)
    byte_offset = np.empty(n, dtype=np.int64)
    byte_length = np.empty(n, dtype=np.int64)
    counts = np.empty(n, dtype=np.int64)
    keys = np.empty(n, dtype=np.uint64)
    key_of: dict[str, int] = {}
    checksums: list[int] = []
    for i, (fqn, off, lens, stored) in enumerate(fragments):
        offsets[i, : len(off)] = off
        lengths[i, : len(lens)] = lens
        key = key_of.get(fqn)
        if key is None:
            key = key_of[fqn] = tensor_key(fqn)
        keys[i] = key
        obj[i] = names.setdefault(stored.object, len(names))
        byte_offset[i] = stored.byte_offset
        byte_length[i] = stored.byte_length
        counts[i] = len(stored.checksums)
        checksums.extend(stored.checksums)
    rows = FragmentRows(
        tensor=np.zeros(n, dtype=np.int64),
        offsets=offsets,
        lengths=lengths,
        objects=list(names),
        object=obj,
        byte_offset=byte_offset,
        byte_length=byte_length,
        checksum_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        checksums=np.array(checksums, dtype=np.uint32),
        rank=np.full(n, rank, dtype=np.int32),
    )
    return keys, rows


def checkpoint_metadata(
    layout: SaveLayout,
    reports: Sequence[RankWritten],
    *,
    save_id: str,
    world_size: int,
    checksum_algorithm: str,
    checksum_block_bytes: int,
    checksum_block_width: int | None,
) -> CheckpointMetadata:
    """The header of a save: the planner's layout joined with what every rank reported."""
    values: dict[str, ValueEntry] = {}
    for report in reports:
        for v in report.values:
            values[v.fqn] = v
    indexes = sorted((r.index for r in reports if r.index is not None), key=lambda i: i.rank)
    rows = sum(i.rows for i in indexes)
    expected = sum(t.fragments for t in layout.tensors.values())
    if rows != expected:
        raise CheckpointError(
            f"ranks reported {rows} fragments written, the plan has {expected}; nothing was committed"
        )
    missing = [fqn for fqn in layout.flatten_mapping if fqn not in layout.tensors and fqn not in values]
    if missing:
        raise CheckpointError(f"no rank reported writing value(s) {missing[:10]}; nothing was committed")
    tensors = layout.tensors
    if reports and all(r.hashes is not None for r in reports if r.index is not None):
        totals = PartialHashes.total([r.hashes for r in reports if r.hashes is not None])
        tensors = {
            fqn: dataclasses.replace(t, content_hash=totals.get(tensor_key(fqn), 0))
            for fqn, t in tensors.items()
        }
    return CheckpointMetadata(
        save_id=save_id,
        world_size=world_size,
        tensors=tensors,
        values=values,
        meshes=layout.meshes,
        flatten_mapping=layout.flatten_mapping,
        checksum_algorithm=checksum_algorithm,
        checksum_block_bytes=checksum_block_bytes,
        checksum_block_width=checksum_block_width,
        patterns=layout.patterns,
        rotate_min_bytes=layout.rotate_min_bytes,
        indexes=indexes,
        torch_version=torch.__version__,
        created=time.time(),
    )


def compact_broadcast(metadata: Metadata, meta: CheckpointMetadata, header: bytes, store: Store) -> None:
    """Make ``metadata`` (what DCP broadcasts to every rank and ``dcp.save`` returns) compact:
    its state-dict metadata becomes a view of the committed checkpoint that pickles as the
    header bytes, and fragment rows are only read if someone asks for chunks."""
    from torch_ucp.storage.reader import CommittedStateDict

    metadata.state_dict_metadata = CommittedStateDict(store, header)
    metadata.planner_data = {k: tuple(v) for k, v in meta.flatten_mapping.items()}
    metadata.storage_meta = StorageMeta(checkpoint_id=store.url, save_id=meta.save_id)


MIN_BLOCK_BYTES = 1 << 10
ITEM_SIZE_MAX = 16  # the largest element size: block widths stay whole elements of any dtype


def _check_flag(name: str, value: Any) -> None:
    if type(value) is not bool:
        raise TypeError(f"UCPWriter: {name} must be True or False, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int, *, multiple: int = 1) -> int:
    if type(value) is not int:
        raise TypeError(f"UCPWriter: {name} must be an int, got {value!r}")
    if not lo <= value <= hi or value % multiple:
        rule = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise ValueError(f"UCPWriter: {name} must be between {lo} and {hi}{rule}, got {value}")
    return value


def _reencode_stock_bytes(data: Any, name: str, allow_pickle: bool) -> tuple[str, bytes]:
    """A stock planner's ``torch.save`` bytes of a value, re-encoded without pickle where the
    value allows (unpickled with ``weights_only=True``: these are this process's own bytes)."""
    raw = data.getvalue() if hasattr(data, "getvalue") else bytes(data)
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            return TORCH_SAVE, raw
        raise UnsafeCheckpointError(
            f"cannot save value {name!r} without pickle: {str(e).splitlines()[0]}. Convert it, "
            "or pass allow_pickle=True to the writer to store it with torch.save (loading it "
            "then needs allow_pickle=True)"
        ) from None
    return encode_value(value, name=name, allow_pickle=allow_pickle)
