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
from collections.abc import Iterator
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
from torch_ucp.errors import CheckpointError, CommitConflictError, UnsafeCheckpointError
from torch_ucp.metadata.codec import encode_metadata, placement_from_json
from torch_ucp.metadata.schema import (
    CheckpointMetadata,
    Fragment,
    MeshInfo,
    ObjectEntry,
    StoredBytes,
    TensorEntry,
)
from torch_ucp.planner.plan_table import write_item_nbytes
from torch_ucp.planner.provenance import SaveInfo, flatten_mapping_of
from torch_ucp.storage import commit
from torch_ucp.storage.checksum import DEFAULT_ALGORITHM, BlockGrid
from torch_ucp.storage.commit import DATA_PREFIX, new_save_id
from torch_ucp.storage.objects import ITEM_ALIGNMENT, ObjectStream
from torch_ucp.storage.store import Store
from torch_ucp.storage.values import TORCH_SAVE, encode_value

logger = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover - every torch platform today
    raise ImportError("torch_ucp stores raw little-endian bytes and needs a little-endian host")

__all__ = ["DATA_PREFIX", "ItemStored", "UCPWriter", "build_checkpoint_metadata", "new_save_id", "tensor_bytes"]


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
    writing ``.metadata`` last, atomically and conditionally (:mod:`torch_ucp.storage.commit`: of
    concurrent saves to one URL at most one commits), and removes data of saves that can no
    longer commit, and nothing else. A save that fails on any rank commits nothing and removes
    its own data; a committed checkpoint at the URL stays loadable until the new one commits.

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
            see :class:`~torch_ucp.storage.checksum.BlockGrid`).
        allow_pickle: store values that have no pickle-free encoding with ``torch.save``
            (default: refuse them, naming the key and the type). Loading them then needs
            ``allow_pickle=True`` too.
        **storage_options: passed to fsspec (``endpoint_url=``, ``key=``, ``anon=`` ...).
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
        **storage_options: Any,
    ) -> None:
        super().__init__()
        _check_flag("overwrite", overwrite)
        _check_flag("allow_pickle", allow_pickle)
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
        self.store = Store(url, storage_options) if url is not None else None
        self.overwrite = overwrite
        self.allow_pickle = allow_pickle
        self._threads = threads
        self.checksum_block_bytes = block_bytes
        self.checksum_block_width = block_width
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

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        assert self.store is not None
        save_id = new_save_id()
        commit.begin(self.store, save_id, overwrite=self.overwrite)  # refuses early, marks the folder
        self.save_id = save_id
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

        with self._removed_on_failure(assignment.save_id):
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
                data, encoding, grid = self._item_bytes(item, planner)
                stored = stream.append(data, grid, self.checksum_algorithm)
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
        resolve_object = getattr(planner, "resolve_object", None)
        if resolve_object is not None:
            encoding, payload = encode_value(resolve_object(item), name=name, allow_pickle=self.allow_pickle)
        else:  # a stock planner hands over torch.save bytes: re-encode them without pickle
            encoding, payload = _reencode_stock_bytes(planner.resolve_data(item), name, self.allow_pickle)
        return memoryview(payload), encoding, self.block_grid((len(payload),), 1)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.store is not None
        meta = build_checkpoint_metadata(
            metadata,
            results,
            checksum_algorithm=self.checksum_algorithm,
            checksum_block_bytes=self.checksum_block_bytes,
            checksum_block_width=self.checksum_block_width,
            save_id=self.save_id,
        )
        self.save_id = meta.save_id
        with self._removed_on_failure(meta.save_id):
            commit.publish(self.store, meta.save_id, encode_metadata(meta), overwrite=self.overwrite,
                           objects=_object_sizes(meta))
        self.metadata = meta
        commit.remove_stale(self.store, meta.save_id)

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


def build_checkpoint_metadata(
    metadata: Metadata,
    results: list[list[WriteResult]],
    *,
    checksum_algorithm: str,
    checksum_block_bytes: int,
    checksum_block_width: int | None = None,
    save_id: str | None = None,
) -> CheckpointMetadata:
    """Join DCP's global metadata with every rank's write results into the torch_ucp format."""
    stored: dict[MetadataIndex, ItemStored] = {
        r.index: r.storage_data for rank_results in results for r in rank_results
    }
    info = SaveInfo.from_planner_data(metadata.planner_data) or SaveInfo()
    if save_id is None:
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
        checksum_block_width=checksum_block_width,
        patterns=info.patterns,
        torch_version=torch.__version__,
        created=time.time(),
    )




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


def _object_sizes(meta: CheckpointMetadata) -> dict[str, int]:
    """Every data object the metadata refers to, and the size it must have at least."""
    sizes: dict[str, int] = {}
    stored = [f.data for t in meta.tensors.values() for f in t.fragments]
    for s in stored + [o.data for o in meta.objects.values()]:
        sizes[s.object] = max(sizes.get(s.object, 0), s.byte_offset + s.byte_length)
    return sizes


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
