"""UCPReader: a DCP StorageReader that reads only the bytes each rank's plan needs."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
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
from torch_ucp.metadata.schema import METADATA_FILE, CheckpointMetadata, IndexRef, ValueEntry
from torch_ucp.metadata.values import decode_value
from torch_ucp.storage.protocols import ValueLoadPlanner
from torch_ucp.storage.reading import BoxRead, FragmentReader, ReadStats, normalize_verify
from torch_ucp.storage.store import Store, open_store
from torch_ucp.storage.transfer_log import log_load


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
        **storage_options: passed to fsspec.

    After a load, ``stats`` holds the bytes read and needed by this rank.
    """

    def __init__(
        self,
        url: str | os.PathLike | None = None,
        *,
        verify: bool | str = True,
        threads: int | None = None,
        allow_pickle: bool = False,
        follow_symlinks: bool = False,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.follow_symlinks = bool(follow_symlinks)
        self.store = self._store(url) if url is not None else None
        self.verify = normalize_verify(verify)
        self.allow_pickle = bool(allow_pickle)
        self.threads = threads
        self.stats = ReadStats()
        self._catalog: FragmentCatalog | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_catalog"] = None
        return state

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
        return catalog_metadata(catalog, self.store.url)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, FragmentCatalog):
            self._catalog = metadata.storage_data
        self._started = time.monotonic()  # for the INFO line of the load (transfer_log)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        catalog = self.catalog()
        meta = catalog.meta
        assert self.store is not None
        planner_lock = threading.Lock()
        reads: list[BoxRead] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                entry = meta.values.get(item.storage_index.fqn)
                if entry is None:
                    raise CheckpointError(f"{item.storage_index.fqn}: no such value in {self.store.url}")
                self._load_value(item, entry, meta, planner)
                continue
            fragment = _fragment(catalog, item.storage_index, self.store.url)
            dest = planner.resolve_tensor(item).detach()
            reads.append(
                BoxRead(
                    name=item.storage_index.fqn,
                    data=fragment.data,
                    dtype=meta.tensors[item.storage_index.fqn].dtype,
                    fragment_offsets=fragment.offsets,
                    fragment_shape=fragment.lengths,
                    offsets=tuple(item.storage_offsets),
                    lengths=tuple(item.lengths),
                    dest=dest,
                    on_done=commit_callback(planner, item, planner_lock),
                )
            )
        reader = FragmentReader.for_checkpoint(self.store, meta, verify=self.verify, threads=self.threads)
        self.stats.add(reader.read(reads))
        log_load(self.store.url, meta.save_id, self.stats.bytes_read, getattr(self, "_started", None))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

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


def commit_callback(planner: LoadPlanner, item: ReadItem, lock: threading.Lock):
    """``BoxRead.on_done`` calling ``planner.commit_tensor`` (serialized: planners need not be
    thread-safe)."""
    def commit(tensor: torch.Tensor) -> None:
        with lock:
            planner.commit_tensor(item, tensor)

    return commit
