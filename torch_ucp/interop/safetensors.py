"""Load Hugging Face safetensors weights with ``dcp.load``, into any layout.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header) and the tensors' raw C-contiguous little-endian bytes. Each tensor is therefore a
fragment of the torch_ucp kind: one box (the whole tensor) stored at a byte offset of an object.
:class:`SafetensorsReader` presents every tensor to ``torch.distributed.checkpoint`` as one chunk
covering the whole tensor and serves each read item with torch_ucp's read engine
(:class:`~torch_ucp.storage.fragment_reader.FragmentReader`, without checksums: safetensors has none),
so a rank reads only the byte ranges of the rows/columns its shard needs, in parallel, straight
into the destination where the layout allows, from a local path or any fsspec URL.

Accepted inputs:

- a folder holding ``model.safetensors.index.json`` (HF sharded: ``weight_map`` names the file of
  each tensor), or another single ``*.safetensors.index.json``;
- a folder holding ``model.safetensors``, or else one or more ``*.safetensors`` files (all used);
- the path of one ``.safetensors`` file or of an ``.index.json`` file.

Example (HF weights into an FSDP2 / TP model)::

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=SafetensorsReader(hf_dir, prefix="model."),
             planner=torch_ucp.UCPLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])

A dtype change is a cast (bf16 weights load into an fp32 model).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError, CheckpointNotFoundError, UnsupportedFormatError
from torch_ucp.interop.base import IndexedReader
from torch_ucp.metadata.dtypes import name_to_dtype
from torch_ucp.metadata.schema import StoredBytes
from torch_ucp.storage.fragment_reader import BoxRead, FragmentReader, ReadStats
from torch_ucp.storage.reader import commit_callback
from torch_ucp.storage.store import Store, open_store
from torch_ucp.storage.urls import split_url

__all__ = [
    "INDEX_NAME",
    "SAFETENSORS_DTYPES",
    "SINGLE_NAME",
    "SafetensorsReader",
    "safetensors_dtype_name",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

#: safetensors' name of each dtype, by the torch_ucp format's name of it (metadata/dtypes.py).
_SAFETENSORS_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}


def _torch_dtypes() -> dict[str, torch.dtype]:
    dtypes = {}
    for name, st_name in _SAFETENSORS_NAMES.items():
        try:
            dtypes[st_name] = name_to_dtype(name)
        except ValueError:  # a dtype this torch does not have (uint16/32/64, float8 before 2.1)
            continue
    return dtypes


#: safetensors dtype names -> torch dtypes (those this torch has).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = _torch_dtypes()
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its name in the file, dtype, shape and bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: StoredBytes


@dataclass
class _SafetensorsIndex:
    """``Metadata.storage_data`` of this reader: the files and one entry per (prefixed) key."""

    url: str
    files: list[str]
    entries: dict[str, SafetensorsEntry] = field(default_factory=dict)
    file_metadata: dict[str, str] = field(default_factory=dict)


def read_header(store: Store, rel: str) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Parse the header of ``rel`` (reading only its first bytes): entries by name in the file,
    and the ``__metadata__`` strings."""
    where = store.describe(rel)
    size_buf = bytearray(8)
    try:
        store.read_into(rel, [(0, 8)], [memoryview(size_buf)])
    except CheckpointError as e:
        raise UnsupportedFormatError(f"{where} is not a safetensors file ({e})") from None
    (n,) = struct.unpack("<Q", size_buf)
    if n < 2 or n > _MAX_HEADER_BYTES:
        raise UnsupportedFormatError(
            f"{where} is not a safetensors file (header length {n} is not plausible)"
        )
    header_buf = bytearray(n)
    try:
        store.read_into(rel, [(8, n)], [memoryview(header_buf)])
        header = json.loads(bytes(header_buf))
    except (CheckpointError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
        raise UnsupportedFormatError(f"{where} is not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise UnsupportedFormatError(f"{where}: safetensors header is not a JSON object")
    base = 8 + n
    entries: dict[str, SafetensorsEntry] = {}
    file_metadata = header.pop("__metadata__", None) or {}
    if not isinstance(file_metadata, dict):
        raise UnsupportedFormatError(f"{where}: safetensors __metadata__ is not a JSON object")
    for name, info in header.items():
        try:
            dtype_name = info["dtype"]
            shape = tuple(_natural(s) for s in info["shape"])
            begin, end = (_natural(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedFormatError(f"{where}: malformed header entry {name!r} ({e!r})") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise UnsupportedFormatError(
                f"{where}: tensor {name!r} has dtype {dtype_name!r}, which this torch cannot "
                f"hold (known: {sorted(SAFETENSORS_DTYPES)})"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise UnsupportedFormatError(
                f"{where}: tensor {name!r} of shape {list(shape)} and dtype {dtype_name} needs "
                f"{nbytes} bytes, its data_offsets [{begin}, {end}] hold {end - begin}"
            )
        entries[name] = SafetensorsEntry(name, dtype, shape, StoredBytes(rel, base + begin, nbytes))
    return entries, {str(k): str(v) for k, v in file_metadata.items()}


def _natural(value: Any) -> int:
    """A JSON integer >= 0 (a dimension or a byte offset)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


class SafetensorsReader(IndexedReader):
    """A DCP ``StorageReader`` over Hugging Face safetensors weights (one file or sharded).

    Args:
        path: a folder with ``model.safetensors.index.json`` or ``*.safetensors`` files, or one
            ``.safetensors`` / ``.index.json`` file; a local path or any fsspec URL.
        prefix: prepended to every tensor name to form the key offered to DCP, e.g.
            ``"model."`` when the target state is ``{"model": model.state_dict()}``.
        threads: parallel range reads (default: torch_ucp's read knob).
        **storage_options: passed to fsspec (``endpoint_url=``, ``key=``, ...).

    After a load, ``stats`` holds the bytes read and needed by this rank.
    """

    index_type = _SafetensorsIndex

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        prefix: str = "",
        threads: int | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.prefix = prefix
        self.threads = threads
        self.storage_options = dict(storage_options)
        self.stats = ReadStats()
        self._index: _SafetensorsIndex | None = None
        self._store: Store | None = None

    # -- locating the files -------------------------------------------------------------------
    def _folder(self) -> tuple[Store, str | None]:
        """The store of the folder holding the weights, and the file ``path`` names in it
        (``None`` when ``path`` is the folder)."""
        parent, name = split_url(self.path)
        if name.endswith((".safetensors", ".index.json")):
            return open_store(parent, self.storage_options), name
        return open_store(self.path, self.storage_options), None

    def _locate(self) -> tuple[Store, list[str], str | None]:
        """``(store at the folder, files relative to it, index file or None)``."""
        store, name = self._folder()
        if name is not None and name.endswith(".index.json"):
            return store, [], name
        if name is not None:
            if not store.exists(name):
                raise CheckpointNotFoundError(f"{self.path} does not exist")
            return store, [name], None
        listing = store.list_dir("")
        if not listing:
            what = "does not exist" if not store.exists("") else "is empty"
            raise CheckpointNotFoundError(f"{self.path} {what}")
        if INDEX_NAME in listing:
            return store, [], INDEX_NAME
        indexes = sorted(n for n in listing if n.endswith(".safetensors.index.json"))
        if len(indexes) == 1:
            return store, [], indexes[0]
        if SINGLE_NAME in listing:
            return store, [SINGLE_NAME], None
        files = sorted(n for n in listing if n.endswith(".safetensors"))
        if not files:
            raise UnsupportedFormatError(
                f"{self.path} holds no safetensors weights (no {INDEX_NAME} and no "
                "*.safetensors file)"
            )
        return store, files, None

    def _build_index(self) -> _SafetensorsIndex:
        store, files, index_name = self._locate()
        weight_map: dict[str, str] | None = None
        if index_name is not None:
            try:
                data = store.read_bytes(
                    index_name, knobs.max_metadata_bytes(), limit_knob="TORCH_UCP_MAX_METADATA_BYTES"
                )
                raw = json.loads(data)
                weight_map = {str(k): str(v) for k, v in raw["weight_map"].items()}
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{store.describe(index_name)} does not exist") from None
            except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
                raise UnsupportedFormatError(
                    f"{store.describe(index_name)} is not a safetensors index (needs a "
                    f"'weight_map' object): {e!r}"
                ) from None
            files = sorted(set(weight_map.values()))
        index = _SafetensorsIndex(url=self.path, files=files)
        origin: dict[str, str] = {}
        for rel in files:
            entries, file_metadata = read_header(store, rel)
            for k, v in file_metadata.items():
                index.file_metadata.setdefault(k, v)
            for name, entry in entries.items():
                if name in origin:
                    raise UnsupportedFormatError(
                        f"tensor {name!r} is in both {store.describe(origin[name])} and "
                        f"{store.describe(rel)}"
                    )
                origin[name] = rel
                index.entries[self.prefix + name] = entry
        if weight_map is not None:
            for name, rel in weight_map.items():
                if origin.get(name) != rel:
                    raise UnsupportedFormatError(
                        f"{store.describe(index_name or '')}: weight_map puts {name!r} in {rel}, "
                        f"but {store.describe(rel)} has no such tensor"
                    )
        self._store = store
        return index

    # -- StorageReader protocol ---------------------------------------------------------------
    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None, **kwargs: Any) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._index = None
        self.stats = ReadStats()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike, **kwargs: Any) -> bool:
        path = os.fspath(checkpoint_id)
        if path.endswith((".safetensors", ".safetensors.index.json")):
            return True
        try:
            names = open_store(path).list_dir("")
        except Exception:  # noqa: BLE001 - not ours
            return False
        return INDEX_NAME in names or SINGLE_NAME in names

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read every file's header: one whole-tensor chunk per key."""
        index = self._index = self._build_index()
        state_md = {}
        for fqn, e in index.entries.items():
            size = torch.Size(e.shape)
            state_md[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=e.dtype),
                size=size,
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)],
            )
        return Metadata(
            state_dict_metadata=state_md,
            storage_data=index,
            storage_meta=StorageMeta(checkpoint_id=self.path),
        )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner, **kwargs: Any) -> Future[None]:
        """Read the byte ranges each item needs, in parallel, into the planner's tensors."""
        index = self._loaded_index()
        store = self._store_for(index)
        lock = threading.Lock()
        reads = []
        for item in plan.items:
            fqn = item.storage_index.fqn
            entry = index.entries.get(fqn)
            if entry is None:
                raise CheckpointError(f"{fqn!r} is not in the safetensors weights at {self.path}")
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"{fqn!r}: safetensors holds tensors only")
            reads.append(
                BoxRead(
                    name=fqn,
                    data=entry.data,
                    dtype=entry.dtype,
                    fragment_offsets=(0,) * len(entry.shape),
                    fragment_shape=entry.shape,
                    offsets=tuple(item.storage_offsets),
                    lengths=tuple(item.lengths),
                    dest=planner.resolve_tensor(item).detach(),
                    on_done=commit_callback(planner, item, lock),
                )
            )
        reader = FragmentReader(store, verify=False, threads=self.threads)
        self.stats.add(reader.read(reads))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # -- helpers ------------------------------------------------------------------------------
    def _store_for(self, index: _SafetensorsIndex) -> Store:
        """The folder's store (re-opened on a rank that received the index, not the reader)."""
        if self._store is None or index.url != self.path:
            self._store, _ = self._folder()
        return self._store

    @property
    def file_metadata(self) -> dict[str, str]:
        """The ``__metadata__`` strings of the files (first file wins on conflicts)."""
        return dict(self._loaded_index().file_metadata)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        return state
