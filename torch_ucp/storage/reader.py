"""UCPReader: a DCP StorageReader that reads only the bytes each rank's plan needs."""

from __future__ import annotations

import io
import os
import threading
import time
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from torch_ucp.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from torch_ucp.metadata.codec import decode_metadata
from torch_ucp.metadata.dcp import to_dcp_metadata
from torch_ucp.metadata.schema import METADATA_FILE, CheckpointMetadata, ObjectEntry
from torch_ucp.storage.checksum import checksum_function
from torch_ucp.storage.reading import BoxRead, FragmentReader, ReadStats
from torch_ucp.storage.store import Store
from torch_ucp.storage.transfer_log import log_load
from torch_ucp.storage.values import decode_value


def load_metadata(store: Store) -> CheckpointMetadata:
    """Read and decode a checkpoint's ``.metadata``, with errors that name the URL."""
    try:
        raw = store.read_bytes(METADATA_FILE)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {store.url}: {store.describe(METADATA_FILE)} is missing"
        ) from None
    return decode_metadata(raw, store.describe(METADATA_FILE))


def read_object(store: Store, entry: ObjectEntry, meta: CheckpointMetadata, verify: bool) -> Any:
    """Read, verify and decode one non-tensor value."""
    data = entry.data
    buf = bytearray(data.byte_length)
    if data.byte_length:
        try:
            store.read_into(data.object, [(data.byte_offset, data.byte_length)], [memoryview(buf)])
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"cannot read value {entry.fqn!r}: {e}") from e
    if verify and data.checksums:
        fn = checksum_function(meta.checksum_algorithm)
        block = meta.checksum_block_bytes
        for i, expected in enumerate(data.checksums):
            if fn(memoryview(buf)[i * block : (i + 1) * block]) != expected:
                raise CorruptCheckpointError(
                    f"checksum mismatch in value {entry.fqn!r}: data object "
                    f"{store.describe(data.object)} bytes [{data.byte_offset + i * block}, "
                    f"{data.byte_offset + min((i + 1) * block, data.byte_length)})"
                )
    return decode_value(entry.encoding, bytes(buf), entry.fqn)


class UCPReader(StorageReader):
    """Reads torch_ucp checkpoints from a local path or any fsspec URL.

    Reads are grouped per data object, nearby byte ranges coalesced and run in parallel, and
    only the bytes the plan needs are fetched (a rank needing a quarter of a fragment reads
    about a quarter). Checksums are verified on read (see ``verify``).

    Args:
        url: checkpoint folder (path or fsspec URL); may instead be passed as ``checkpoint_id``.
        verify: ``True`` (default) verifies every checksum block a read covers, widening reads to
            whole blocks when that costs at most ``TORCH_UCP_READ_WASTE_RATIO`` (10%) extra;
            ``"full"`` always widens, so every loaded byte is verified; ``False`` skips checks.
        threads: parallel range reads per rank.
        **storage_options: passed to fsspec.

    After a load, ``stats`` holds the bytes read and needed by this rank.
    """

    def __init__(
        self,
        url: str | os.PathLike | None = None,
        *,
        verify: bool | str = True,
        threads: int | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.store = Store(url, storage_options) if url is not None else None
        self.verify = verify
        self.threads = threads
        self.stats = ReadStats()
        self._meta: CheckpointMetadata | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_meta"] = None
        return state

    @property
    def checkpoint_id(self) -> str | None:
        return self.store.url if self.store is not None else None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.store = Store(checkpoint_id, self.storage_options)
        self._meta = None
        self.stats = ReadStats()

    def checkpoint_metadata(self) -> CheckpointMetadata:
        """The decoded torch_ucp metadata (read once per reader)."""
        if self.store is None:
            raise CheckpointError("UCPReader needs a URL: UCPReader(url) or dcp.load(checkpoint_id=)")
        if self._meta is None:
            self._meta = load_metadata(self.store)
        return self._meta

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        assert self.store is not None or self.checkpoint_metadata()
        return to_dcp_metadata(self.checkpoint_metadata(), self.store.url)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self._storage_data = metadata.storage_data
        self._started = time.monotonic()  # for the INFO line of the load (transfer_log)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        meta = self.checkpoint_metadata()
        assert self.store is not None
        planner_lock = threading.Lock()
        reads: list[BoxRead] = []
        for item in plan.items:
            location = self._storage_data.get(item.storage_index)
            if location is None:
                raise CheckpointError(f"{item.storage_index.fqn}: not in {self.store.url}")
            if item.type == LoadItemType.BYTE_IO:
                self._load_value(item, location, meta, planner)
                continue
            entry, fragment = location
            dest = planner.resolve_tensor(item).detach()
            reads.append(
                BoxRead(
                    name=entry.fqn,
                    data=fragment.data,
                    dtype=entry.dtype,
                    fragment_offsets=fragment.offsets,
                    fragment_shape=fragment.lengths,
                    offsets=tuple(item.storage_offsets),
                    lengths=tuple(item.lengths),
                    dest=dest,
                    on_done=commit_callback(planner, item, planner_lock),
                )
            )
        reader = FragmentReader(
            self.store,
            verify=self.verify,
            checksum_algorithm=meta.checksum_algorithm,
            block_bytes=meta.checksum_block_bytes,
            threads=self.threads,
        )
        self.stats.add(reader.read(reads))
        log_load(self.store.url, meta.save_id, self.stats.bytes_read, getattr(self, "_started", None))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _load_value(
        self, item: ReadItem, entry: ObjectEntry, meta: CheckpointMetadata, planner: LoadPlanner
    ) -> None:
        assert self.store is not None
        value = read_object(self.store, entry, meta, bool(self.verify))
        load_object = getattr(planner, "load_object", None)
        if load_object is not None:
            load_object(item, value)
            return
        buf = io.BytesIO()
        torch.save(value, buf)
        buf.seek(0)
        planner.load_bytes(item, buf)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def commit_callback(planner: LoadPlanner, item: ReadItem, lock: threading.Lock):
    """``BoxRead.on_done`` calling ``planner.commit_tensor`` (serialized: planners need not be
    thread-safe)."""
    def commit(tensor: torch.Tensor) -> None:
        with lock:
            planner.commit_tensor(item, tensor)

    return commit
