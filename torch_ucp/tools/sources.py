"""One read interface over every checkpoint format torch_ucp understands.

``torch-ucp inspect``, ``export`` and ``convert`` work on any of:

- ``torch_ucp``: a folder whose ``.metadata`` starts with ``{`` (JSON), read with
  :func:`torch_ucp.open_checkpoint` (checksums verified, only the needed bytes read);
- ``dcp``: a stock ``torch.distributed.checkpoint`` folder (``.metadata`` is a pickle), read with
  DCP's ``FileSystemReader`` (local) or ``FsspecReader`` (other URLs). Reading it unpickles its
  ``.metadata``, as stock DCP does, so it is opened only with ``trust_pickle=True``
  (``--trust-pickle``); its values load with ``weights_only=True`` unless trusted;
- ``deepspeed_universal``: a ``ds_to_universal`` output folder (``zero/``) or the folder holding
  ``latest_universal``, read with :class:`~torch_ucp.interop.DeepSpeedUniversalReader`;
- ``safetensors``: Hugging Face weights (a ``.safetensors`` file, or a folder with
  ``model.safetensors.index.json`` or ``*.safetensors``), read with
  :class:`~torch_ucp.interop.SafetensorsReader`.

:func:`open_source` detects the format and returns a :class:`CheckpointSource`: the keys with
dtype and shape (plus fragment/chunk counts and the saved mesh and placements where the format
records them), and ``read_tensor`` / ``read_value`` that materialise ONE whole tensor or value,
so a caller streaming key by key holds one tensor at a time.

Errors: a problem with the checkpoint is a :class:`~torch_ucp.errors.CheckpointError` naming the
URL (and the key), raised by torch_ucp's own readers; what stock DCP's ``FileSystemReader`` /
``FsspecReader`` raise (``torch.load``, pickle and fsspec errors) is turned into one at that
boundary. A failure of the storage itself (permission denied, an unreachable endpoint) is raised
as the storage raised it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.storage import StorageReader

from torch_ucp import _compat
from torch_ucp.checkpoint import Checkpoint
from torch_ucp.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from torch_ucp.metadata.fields import Fields
from torch_ucp.metadata.provenance import SaveInfo
from torch_ucp.metadata.schema import METADATA_FILE, MeshInfo, PlacementInfo
from torch_ucp.planner.load_planner import UCPLoadPlanner
from torch_ucp.storage.reader import open_catalog
from torch_ucp.storage.store import open_store
from torch_ucp.storage.urls import is_local_url, local_path

__all__ = [
    "FORMATS",
    "CheckpointSource",
    "TensorInfo",
    "ValueInfo",
    "detect_format",
    "open_source",
    "select_keys",
]

FORMAT_UCP = "torch_ucp"
FORMAT_DCP = "dcp"
FORMAT_DEEPSPEED = "deepspeed_universal"
FORMAT_SAFETENSORS = "safetensors"
FORMATS = (FORMAT_UCP, FORMAT_DCP, FORMAT_DEEPSPEED, FORMAT_SAFETENSORS)


@dataclass
class TensorInfo:
    """A tensor of a checkpoint, as saved.

    Attributes:
        fqn: the key.
        dtype / shape: element type and logical (global) shape.
        pieces: stored pieces: fragments (torch_ucp), chunks (stock DCP), 1 otherwise.
        mesh / placements: the DeviceMesh and DTensor placements it was saved from, where the
            checkpoint records them (torch_ucp; stock DCP saved with ``UCPSavePlanner``).
        path: the key's path in the nested state dict (DCP's flatten mapping), if recorded.
        saved_as: what the saving ranks held, where the checkpoint says and it was neither a
            DTensor nor a plain tensor (``"sharded_tensor"``).
    """

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: int = 1
    mesh: MeshInfo | None = None
    placements: tuple[PlacementInfo, ...] | None = None
    path: tuple[Any, ...] | None = None
    saved_as: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ValueInfo:
    """A non-tensor value: its key, how it is stored (if known) and its stored size."""

    fqn: str
    encoding: str | None = None
    nbytes: int | None = None
    path: tuple[Any, ...] | None = None


@contextlib.contextmanager
def _stock_dcp_errors(what: str, kind: type[CheckpointError]) -> Iterator[None]:
    """Stock DCP's readers raise whatever ``torch.load``, pickle or fsspec raise: re-raise it as
    ``kind`` (a missing file as :class:`CheckpointNotFoundError`) naming ``what``; torch_ucp's
    own errors (the load planner's) pass through."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(_one_line(f"{what}: {e}")) from e
    except Exception as e:  # noqa: BLE001 - the message names the reader's error
        raise kind(_one_line(f"{what}: {type(e).__name__}: {e}")) from e


def _one_line(text: str) -> str:
    return " ".join(text.split())


class CheckpointSource:
    """Keys, dtypes, shapes and whole-tensor reads of one checkpoint, whatever its format.

    Attributes:
        url: the checkpoint's path or URL.
        format: one of :data:`FORMATS`.
        pieces_name: what ``TensorInfo.pieces`` counts (``"fragments"``, ``"chunks"``, ...).
        tensors / values: every key, in saved order.
    """

    format: str = ""
    pieces_name: str = "pieces"

    def __init__(self, url: str) -> None:
        self.url = url
        self.tensors: dict[str, TensorInfo] = {}
        self.values: dict[str, ValueInfo] = {}

    def keys(self) -> list[str]:
        return [*self.tensors, *self.values]

    def __contains__(self, fqn: object) -> bool:
        return fqn in self.tensors or fqn in self.values

    def read_tensor(self, fqn: str) -> torch.Tensor:
        """The whole tensor ``fqn`` as a new CPU tensor of its saved dtype."""
        raise NotImplementedError

    def read_value(self, fqn: str) -> Any:
        """The non-tensor value ``fqn``."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """Checkpoint-level facts; ``None`` where the format does not record them."""
        return {
            "format": self.format,
            "version": None,
            "save_id": None,
            "world_size": None,
            "data_objects": None,
            "indexes": None,
            "torch_version": None,
            "created": None,
        }

    def meshes(self) -> list[MeshInfo]:
        """The distinct meshes the tensors were saved from."""
        out: list[MeshInfo] = []
        for t in self.tensors.values():
            if t.mesh is not None and t.mesh not in out:
                out.append(t.mesh)
        return out

    def _tensor_info(self, fqn: str) -> TensorInfo:
        info = self.tensors.get(fqn)
        if info is None:
            kind = "a non-tensor value" if fqn in self.values else "not in the checkpoint"
            raise CheckpointError(f"{fqn!r} is {kind} ({self.url})")
        return info

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, {self.format}, {len(self.tensors)} tensors, "
            f"{len(self.values)} values)"
        )


class UCPSource(CheckpointSource):
    """A torch_ucp checkpoint, read through :class:`torch_ucp.Checkpoint`."""

    format = FORMAT_UCP
    pieces_name = "fragments"

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint.url)
        self.checkpoint = checkpoint
        meta = checkpoint.metadata
        mapping = meta.flatten_mapping
        for fqn, t in meta.tensors.items():
            self.tensors[fqn] = TensorInfo(
                fqn,
                t.dtype,
                tuple(t.shape),
                t.fragments,
                meta.meshes[t.mesh] if t.mesh is not None and t.mesh < len(meta.meshes) else None,
                t.placements,
                tuple(mapping[fqn]) if fqn in mapping else None,
                t.saved_as,
            )
        for fqn, o in meta.values.items():
            self.values[fqn] = ValueInfo(
                fqn, o.encoding, o.data.byte_length, tuple(mapping[fqn]) if fqn in mapping else None
            )

    def read_tensor(self, fqn: str) -> torch.Tensor:
        self._tensor_info(fqn)
        return self.checkpoint.read(fqn)

    def read_value(self, fqn: str) -> Any:
        if fqn not in self.values:
            raise CheckpointError(f"{fqn!r} is not a non-tensor value of {self.url}")
        return self.checkpoint.read(fqn)

    def summary(self) -> dict[str, Any]:
        meta = self.checkpoint.metadata
        return {
            "format": self.format,
            "version": meta.version,
            "save_id": meta.save_id,
            "world_size": meta.world_size,
            "data_objects": None,
            "indexes": len(meta.indexes) if meta.version >= 2 else None,
            "torch_version": meta.torch_version or None,
            "created": meta.created or None,
        }

    def meshes(self) -> list[MeshInfo]:
        return list(self.checkpoint.metadata.meshes)


_PLACEHOLDER = 0  # a leaf DCP's flattening keeps, replaced by the loaded value


class ReaderSource(CheckpointSource):
    """Any DCP ``StorageReader``: the metadata is read once; each ``read_tensor`` runs one load
    plan (torch_ucp's planner, for a plain tensor) for that key alone."""

    pieces_name = "chunks"
    value_encoding: str | None = None

    def __init__(self, reader: StorageReader, url: str, fmt: str, *, trust_pickle: bool = False) -> None:
        super().__init__(url)
        self.format = fmt
        self.reader = reader
        self.trust_pickle = trust_pickle
        with self._reader_errors(f"cannot read the {fmt} checkpoint metadata of {url}", UnsupportedFormatError):
            self.dcp_metadata: Metadata = reader.read_metadata()
            reader.set_up_storage_reader(self.dcp_metadata, True)
        planner_data = self.dcp_metadata.planner_data
        paths = planner_data if isinstance(planner_data, dict) else {}
        info = SaveInfo.from_planner_data(planner_data) if isinstance(planner_data, dict) else None
        fields = Fields(url)
        meshes = [fields.mesh(m, f"planner_data mesh {i}") for i, m in enumerate(info.meshes if info else [])]
        for fqn, md in self.dcp_metadata.state_dict_metadata.items():
            path = paths.get(fqn)
            path = tuple(path) if isinstance(path, (tuple, list)) else None
            if isinstance(md, TensorStorageMetadata):
                layout = info.tensors.get(fqn, {}) if info else {}
                mesh_index = layout.get("mesh")
                placements = layout.get("placements")
                self.tensors[fqn] = TensorInfo(
                    fqn,
                    md.properties.dtype,
                    tuple(md.size),
                    len(md.chunks),
                    meshes[mesh_index] if mesh_index is not None and mesh_index < len(meshes) else None,
                    fields.placements(placements, fqn) if placements else None,
                    path,
                )
            elif isinstance(md, BytesStorageMetadata):
                self.values[fqn] = ValueInfo(fqn, self.value_encoding, self._value_nbytes(fqn), path)

    def _value_nbytes(self, fqn: str) -> int | None:
        return None

    def _reader_errors(self, what: str, kind: type[CheckpointError]) -> contextlib.AbstractContextManager[None]:
        """What the reader raises, as it raises it: torch_ucp's readers raise torch_ucp errors."""
        return contextlib.nullcontext()

    def _load(self, state: dict[str, Any]) -> None:
        planner = UCPLoadPlanner(allow_partial_load=True, allow_pickle=self.trust_pickle)
        planner.set_up_planner(state, self.dcp_metadata, True)
        plan = self.reader.prepare_local_plan(planner.create_local_plan())
        plans = self.reader.prepare_global_plan(planner.create_global_plan([plan]))
        plan = planner.finish_plan(plans[0])
        self.reader.read_data(plan, planner).wait()

    def read_tensor(self, fqn: str) -> torch.Tensor:
        info = self._tensor_info(fqn)
        out = torch.empty(info.shape, dtype=info.dtype)
        with self._reader_errors(f"cannot read {fqn!r} from {self.url}", CorruptCheckpointError):
            self._load({fqn: out})
        return out

    def read_value(self, fqn: str) -> Any:
        if fqn not in self.values:
            raise CheckpointError(f"{fqn!r} is not a non-tensor value of {self.url}")
        state: dict[str, Any] = {fqn: _PLACEHOLDER}
        with self._reader_errors(f"cannot read value {fqn!r} from {self.url}", CorruptCheckpointError):
            self._load(state)
        return state[fqn]


_RANK_FILE = re.compile(r"^__(\d+)_")


class DCPSource(ReaderSource):
    """A stock DCP checkpoint (pickled ``.metadata`` + ``*.distcp`` files)."""

    value_encoding = "torch_save"  # stock DCP stores every non-tensor value with torch.save

    def __init__(self, reader: StorageReader, url: str, *, trust_pickle: bool = False) -> None:
        super().__init__(reader, url, FORMAT_DCP, trust_pickle=trust_pickle)

    def _reader_errors(self, what: str, kind: type[CheckpointError]) -> contextlib.AbstractContextManager[None]:
        return _stock_dcp_errors(what, kind)

    def _storage_files(self) -> dict[Any, str]:
        storage = self.dcp_metadata.storage_data
        if not isinstance(storage, dict):
            return {}
        return {
            k: getattr(v, "relative_path", None) for k, v in storage.items()
            if getattr(v, "relative_path", None)
        }

    def _value_nbytes(self, fqn: str) -> int | None:
        storage = self.dcp_metadata.storage_data
        if not isinstance(storage, dict):
            return None
        v = storage.get(MetadataIndex(fqn))
        return int(v.length) if hasattr(v, "length") else None

    def summary(self) -> dict[str, Any]:
        files = set(self._storage_files().values())
        ranks = {m.group(1) for m in (_RANK_FILE.match(os.path.basename(f)) for f in files) if m}
        storage_meta = self.dcp_metadata.storage_meta
        return {
            "format": self.format,
            "version": getattr(self.dcp_metadata, "version", None),
            "save_id": getattr(storage_meta, "save_id", None),
            "world_size": len(ranks) if ranks else None,
            "data_objects": len(files),
            "torch_version": None,
            "created": None,
        }


def detect_format(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The format of the checkpoint at ``url`` (one of :data:`FORMATS`).

    ``.metadata`` starting with ``{`` is torch_ucp, any other ``.metadata`` stock DCP; a
    ``zero/`` folder or ``latest_universal`` file is DeepSpeed universal; ``.safetensors`` files
    or an ``*.safetensors.index.json`` are safetensors. Raises
    :class:`~torch_ucp.errors.CheckpointNotFoundError` when nothing is at ``url`` and
    :class:`~torch_ucp.errors.UnsupportedFormatError` when it is none of these.
    """
    url = os.fspath(url)
    if url.endswith((".safetensors", ".safetensors.index.json")):
        return FORMAT_SAFETENSORS
    store = open_store(url, storage_options or {})
    if store.exists(METADATA_FILE):
        first = bytearray(1)
        store.read_into(METADATA_FILE, [(0, 1)], [memoryview(first)])
        if first == b"{":
            return FORMAT_UCP
        if first == b"\x80":  # pickle protocol 2+: DCP's Metadata
            return FORMAT_DCP
        raise UnsupportedFormatError(
            f"{store.describe(METADATA_FILE)} is neither torch_ucp JSON metadata nor a "
            "stock DCP (pickled) metadata file"
        )
    names = store.list_dir("")
    if "zero" in names or "latest_universal" in names:
        return FORMAT_DEEPSPEED
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return FORMAT_SAFETENSORS
    if not store.exists(""):
        raise CheckpointNotFoundError(f"{url} does not exist")
    raise UnsupportedFormatError(
        f"{url} is not a checkpoint: no {METADATA_FILE} (torch_ucp or DCP), no zero/ or "
        "latest_universal (DeepSpeed universal), no *.safetensors"
    )


def open_source(
    url: str | os.PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    format: str | None = None,
    verify: bool | str = True,
    trust_pickle: bool = False,
) -> CheckpointSource:
    """Open the checkpoint at ``url`` for reading, detecting its format unless ``format``.

    ``verify`` applies to torch_ucp checkpoints (checksums, as in :func:`open_checkpoint`).
    ``trust_pickle`` allows unpickling: a stock DCP ``.metadata`` (refused otherwise, with
    :class:`~torch_ucp.errors.UnsafeCheckpointError`) and values stored with ``torch.save``.
    """
    url = os.fspath(url)
    options = dict(storage_options or {})
    fmt = format or detect_format(url, options)
    if fmt == FORMAT_UCP:
        store = open_store(url, options)
        return UCPSource(Checkpoint(store, open_catalog(store), verify=verify, allow_pickle=trust_pickle))
    if fmt == FORMAT_DCP:
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{url} is a stock torch.distributed.checkpoint checkpoint: its {METADATA_FILE} "
                "is a pickle, and reading it runs any code the file names. Only if you trust "
                "it, pass --trust-pickle (trust_pickle=True); torch-ucp convert --trust-pickle "
                "turns it into a torch_ucp checkpoint that never needs it"
            )
        if is_local_url(url):
            from torch.distributed.checkpoint import FileSystemReader

            reader: StorageReader = FileSystemReader(local_path(url))
        else:
            reader = _compat.fsspec_dcp_reader(url, options)
        return DCPSource(reader, url, trust_pickle=True)
    if fmt == FORMAT_DEEPSPEED:
        from torch_ucp.interop.deepspeed import DeepSpeedUniversalReader

        return ReaderSource(DeepSpeedUniversalReader(url, **options), url, FORMAT_DEEPSPEED)
    if fmt == FORMAT_SAFETENSORS:
        from torch_ucp.interop.safetensors import SafetensorsReader

        return ReaderSource(SafetensorsReader(url, **options), url, FORMAT_SAFETENSORS)
    raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")


def select_keys(keys: Iterable[str], patterns: Iterable[str] | None) -> list[str]:
    """The keys matching any of the shell-style ``patterns`` (all keys when there are none)."""
    patterns = list(patterns or [])
    keys = list(keys)
    if not patterns:
        return keys
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
