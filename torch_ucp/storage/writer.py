"""UCPWriter: a DCP StorageWriter streaming fragments as raw bytes to any fsspec URL."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError, CheckpointExistsError
from torch_ucp.metadata.codec import encode_metadata, placement_from_json
from torch_ucp.metadata.schema import (
    METADATA_FILE,
    CheckpointMetadata,
    Fragment,
    MeshInfo,
    ObjectEntry,
    StoredBytes,
    TensorEntry,
)
from torch_ucp.planner.plan_table import write_item_nbytes
from torch_ucp.planner.provenance import SaveInfo, flatten_mapping_of
from torch_ucp.storage.checksum import DEFAULT_ALGORITHM
from torch_ucp.storage.objects import ITEM_ALIGNMENT, ObjectStream
from torch_ucp.storage.store import Store
from torch_ucp.storage.transfer_log import log_save
from torch_ucp.storage.values import encode_value

logger = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - every torch platform today
    raise ImportError("torch_ucp stores raw little-endian bytes and needs a little-endian host")

DATA_PREFIX = "data-"


@dataclass(frozen=True)
class _RankAssignment:
    """What the coordinator tells each rank in ``SavePlan.storage_data``."""

    save_id: str
    rank: int


@dataclass(frozen=True)
class ItemStored:
    """``WriteResult.storage_data``: where an item's bytes went and how they are encoded."""

    data: StoredBytes
    rank: int
    encoding: str | None = None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a zero-copy view (copies only to make it CPU-contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def new_save_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


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
    ``data-<save_id>/``, computing block checksums on the way; the coordinator then commits by
    writing ``.metadata`` last and atomically, and removes data objects of earlier or abandoned
    saves. A save that fails on any rank commits nothing, and a committed checkpoint at the URL
    stays loadable until the new one is committed.

    Args:
        url: checkpoint folder: a path or fsspec URL (``s3://bucket/run/step-100``). May be
            given later as ``checkpoint_id`` to ``dcp.save``.
        overwrite: allow replacing a committed checkpoint at the same URL.
        threads: writer threads (= data objects, = uploads in flight) per rank; default 2 on
            local disk (``TORCH_UCP_WRITE_THREADS``), 8 on object stores
            (``TORCH_UCP_REMOTE_WRITE_THREADS``).
        checksum_block_bytes: checksum granularity.
        **storage_options: passed to fsspec (``endpoint_url=``, ``key=``, ``anon=`` ...).
    """

    def __init__(
        self,
        url: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        threads: int | None = None,
        checksum_block_bytes: int | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.store = Store(url, storage_options) if url is not None else None
        self.overwrite = overwrite
        self._threads = threads
        self.checksum_block_bytes = checksum_block_bytes or knobs.checksum_block_bytes()
        self.checksum_algorithm = DEFAULT_ALGORITHM
        self.is_coordinator = False
        self.save_id: str | None = None
        self.bytes_written = 0
        self.metadata: CheckpointMetadata | None = None  # the coordinator's, after a commit

    @property
    def threads(self) -> int:
        """Writer threads (= data objects) per rank: 2 on local disk, 8 on object stores."""
        if self._threads:
            return self._threads
        local = self.store is None or self.store.is_local
        return knobs.write_threads() if local else knobs.remote_write_threads()

    @property
    def url(self) -> str | None:
        return self.store.url if self.store is not None else None

    @property
    def checkpoint_id(self) -> str | None:
        return self.url

    # -- StorageWriter protocol ---------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.store = Store(checkpoint_id, self.storage_options)
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
        if not self.overwrite and self.store.exists(METADATA_FILE):
            raise CheckpointExistsError(
                f"{self.store.url} already holds a committed checkpoint; pass "
                "UCPWriter(..., overwrite=True) to replace it"
            )
        save_id = new_save_id()
        return [
            dataclasses.replace(plan, storage_data=_RankAssignment(save_id, rank))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        assert self.store is not None
        assignment: _RankAssignment = plan.storage_data
        self.save_id = assignment.save_id
        folder = f"{DATA_PREFIX}{assignment.save_id}"
        bins = _balance(list(plan.items), max(1, min(self.threads, len(plan.items))))

        def write_object(k: int, items: list[WriteItem]) -> list[WriteResult]:
            rel = f"{folder}/{assignment.rank:05d}-{k}.bin"
            return self.store.retrying(
                lambda: self._write_object(rel, items, planner, assignment.rank),
                f"writing {self.store.describe(rel)}",
            )

        self.store.makedirs(folder)
        if len(bins) <= 1:
            results = [r for k, b in enumerate(bins) for r in write_object(k, b)]
        else:
            with ThreadPoolExecutor(len(bins), "ucp-write") as pool:
                futures = [pool.submit(write_object, k, b) for k, b in enumerate(bins)]
                results = [r for f in futures for r in f.result()]
        if bins:
            self.store.fsync_dir(folder)
        self.bytes_written = sum(r.size_in_bytes for r in results)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_object(
        self, rel: str, items: list[WriteItem], planner: SavePlanner, rank: int
    ) -> list[WriteResult]:
        """Stream ``items`` into one data object; on failure abort it (retries rewrite it)."""
        assert self.store is not None
        results = []
        stream = ObjectStream(self.store, rel, ITEM_ALIGNMENT)
        try:
            for item in items:
                data, encoding = self._item_bytes(item, planner)
                stored = stream.append(data, self.checksum_block_bytes, self.checksum_algorithm)
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=len(data),
                        storage_data=ItemStored(stored, rank, encoding),
                    )
                )
            stream.close()
        except BaseException:
            stream.abort()
            raise
        return results

    def _item_bytes(self, item: WriteItem, planner: SavePlanner) -> tuple[memoryview, str | None]:
        if item.type != WriteItemType.BYTE_IO:
            return tensor_bytes(planner.resolve_data(item)), None
        resolve_object = getattr(planner, "resolve_object", None)
        if resolve_object is not None:
            encoding, payload = encode_value(resolve_object(item))
            return memoryview(payload), encoding
        return memoryview(planner.resolve_data(item).getvalue()), "torch_save"

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.store is not None
        meta = build_checkpoint_metadata(
            metadata,
            results,
            checksum_algorithm=self.checksum_algorithm,
            checksum_block_bytes=self.checksum_block_bytes,
        )
        self.save_id = meta.save_id
        self.store.write_atomic(METADATA_FILE, encode_metadata(meta))
        self.metadata = meta
        self._remove_stale(meta.save_id)
        log_save(self.store.url, meta.save_id, results, getattr(self, "_started", None))

    def _remove_stale(self, save_id: str) -> None:
        """Delete data of earlier or abandoned saves, never the one just committed."""
        assert self.store is not None
        for name in self.store.list_dir(""):
            stale_data = name.startswith(DATA_PREFIX) and name != f"{DATA_PREFIX}{save_id}"
            stale_tmp = name.startswith(f"{METADATA_FILE}.tmp-") or name.startswith(
                f".{METADATA_FILE}.tmp-"
            )
            if stale_data or stale_tmp:
                logger.info("torch_ucp: removing stale %s", self.store.describe(name))
                self.store.remove(name)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.url, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def build_checkpoint_metadata(
    metadata: Metadata,
    results: list[list[WriteResult]],
    *,
    checksum_algorithm: str,
    checksum_block_bytes: int,
) -> CheckpointMetadata:
    """Join DCP's global metadata with every rank's write results into the torch_ucp format."""
    stored: dict[MetadataIndex, ItemStored] = {
        r.index: r.storage_data for rank_results in results for r in rank_results
    }
    info = SaveInfo.from_planner_data(metadata.planner_data) or SaveInfo()
    save_ids = {s.data.object.split("/", 1)[0] for s in stored.values()}
    save_id = next(iter(save_ids))[len(DATA_PREFIX):] if save_ids else new_save_id()
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, ObjectEntry] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            s = stored.get(MetadataIndex(fqn))
            if s is None:
                raise CheckpointError(f"no rank reported writing value {fqn!r}")
            objects[fqn] = ObjectEntry(fqn, s.encoding or "torch_save", s.data, s.rank)
            continue
        assert isinstance(md, TensorStorageMetadata)
        tinfo = info.tensors.get(fqn, {})
        fragments = []
        for chunk, (_, coordinate) in zip(md.chunks, info.sources(fqn, len(md.chunks))):
            s = stored.get(MetadataIndex(fqn, chunk.offsets))
            if s is None:
                raise CheckpointError(
                    f"no rank reported writing {fqn!r} fragment at offsets {list(chunk.offsets)}"
                )
            fragments.append(
                Fragment(
                    offsets=tuple(chunk.offsets),
                    lengths=tuple(chunk.sizes),
                    data=s.data,
                    rank=s.rank,
                    coordinate=coordinate,
                )
            )
        placements = tinfo.get("placements")
        tensors[fqn] = TensorEntry(
            fqn=fqn,
            dtype=md.properties.dtype,
            shape=tuple(md.size),
            fragments=fragments,
            mesh=tinfo.get("mesh"),
            placements=tuple(placement_from_json(p) for p in placements) if placements else None,
        )
    return CheckpointMetadata(
        save_id=save_id,
        world_size=len(results),
        tensors=tensors,
        objects=objects,
        meshes=[
            MeshInfo(tuple(m["shape"]), tuple(m["dim_names"]) if m.get("dim_names") else None)
            for m in info.meshes
        ],
        flatten_mapping=flatten_mapping_of(metadata.planner_data),
        checksum_algorithm=checksum_algorithm,
        checksum_block_bytes=checksum_block_bytes,
        patterns=info.patterns,
        torch_version=torch.__version__,
        created=time.time(),
    )


