"""Load a DeepSpeed universal checkpoint into PyTorch state dicts with ``dcp.load``.

DeepSpeed's ``ds_to_universal`` turns a ZeRO checkpoint into one folder of whole tensors per
parameter. Version 0.19.8 writes (``<out>`` is ``--output_folder``)::

    <out>/zero/<param name>/fp32.pt         fp32 master weight
    <out>/zero/<param name>/exp_avg.pt      Adam first moment
    <out>/zero/<param name>/exp_avg_sq.pt   Adam second moment
    <out>/zero/<param name>/step.pt         ZeRO-1/2 only: the Adam step (a 0-d tensor)
    <out>/zero/optimizer_state.pt           common optimizer state: ``param_groups``, loss
                                            scaler, ...; for ZeRO-3 also rank 0's whole
                                            optimizer state dict, which holds the Adam step
    <out>/mp_rank_00_model_states.pt        ZeRO-1/2: copied model-states file
    <out>/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: copied model-states files
    <out>/../latest_universal               text file naming <out>

ZeRO-1/2 tensor files hold ``{'param': full tensor, 'cat_dim': int, ...}`` (plus
``vocab_tensor: True`` for a vocabulary parameter already stripped to ``original_vocab_size``).
Parameters without optimizer state get only ``fp32.pt`` = ``{'param': tensor}``. ZeRO-3
(without tensor parallelism) files hold a bare flat 1-D tensor; its shape is in the
model-states file's ``param_shapes``.

:class:`DeepSpeedUniversalReader` presents such a folder to ``torch.distributed.checkpoint`` as
a checkpoint whose flattened keys follow ``get_state_dict(model, optimizer)`` nested under two
prefixes::

    model.<name>                       <- zero/<name>/fp32.pt (cast to the target's dtype)
    optim.state.<name>.exp_avg         <- zero/<name>/exp_avg.pt
    optim.state.<name>.exp_avg_sq      <- zero/<name>/exp_avg_sq.pt
    optim.state.<name>.step            <- zero/<name>/step.pt, else zero/optimizer_state.pt

Every tensor is one chunk covering the whole tensor, so any target layout (plain tensors, FSDP2
DTensors, ...) is served by narrowing the whole tensor to the requested box. Files are read one
at a time in sorted order, only those the plan needs, so host memory stays bounded by the
largest file (local files are memory-mapped, so only the needed bytes are touched; through
another fsspec filesystem each needed file is read whole, once per ``read_data`` call). The
ZeRO-3 step is read from ``zero/optimizer_state.pt``, which also holds rank 0's flat fp32
partition and moments: mapped locally, read whole elsewhere.

Decisions
- ``param_groups`` (lr, betas, eps, weight_decay, ...) are NOT offered by default: DeepSpeed's
  groups are numbered over its own flattened groups and its LR scheduler owns ``lr``, so copying
  them by index into the target's groups can silently mis-assign hyperparameters. Load with a
  planner that allows partial loads (``DefaultLoadPlanner(allow_partial_load=True)``) and the
  target keeps its own. ``load_param_groups=True`` offers ``optim.param_groups.<i>.<key>``
  (every key but ``params``) from ``zero/optimizer_state.pt``.
- The step is offered as a 0-d float32 tensor (what ``torch.optim.AdamW`` keeps); a stored int,
  float or tensor is cast into the target tensor. ``step_as="float"`` offers it as a Python
  float instead, for optimizers whose ``step`` is a number.
- A ZeRO-3 flat tensor takes the shape recorded in ``param_shapes`` of the first model-states
  file; without that file it stays 1-D (and a shape mismatch with the target is reported by the
  planner).
- Names come from the ``zero/`` folders and the model-states ``param_shapes``. A parameter in
  ``param_shapes`` is trainable: its fp32, moments and step are always offered, so a missing
  file fails the load with an error naming the key and the file expected, instead of being
  skipped silently by a partial-load planner.
- Files load with ``torch.load(weights_only=True)``. DeepSpeed's own objects in the common
  files (``LossScaler``, ``ZeroStageEnum``) are replaced by inert stand-ins; any other
  non-weights global is refused. DeepSpeed need not be importable.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from torch_ucp.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from torch_ucp.interop.base import IndexedReader
from torch_ucp.metadata.placements import narrow
from torch_ucp.storage.store import Store, open_store

__all__ = ["DeepSpeedUniversalReader"]

ZERO_DIR = "zero"
LATEST_FILE = "latest_universal"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
TENSOR_STATES = ("fp32", "exp_avg", "exp_avg_sq")
STEP_STATE = "step"
_PARAM_FILES = {f"{s}.pt" for s in (*TENSOR_STATES, STEP_STATE)}


@dataclass(frozen=True)
class _Source:
    """Where one flattened key's value lives in the universal checkpoint.

    Attributes:
        param: DeepSpeed parameter name (the folder under ``zero/``).
        state: ``fp32``, ``exp_avg``, ``exp_avg_sq``, ``step`` or ``param_group``.
        relpath: file relative to the checkpoint root, ``/``-separated.
        shape: final shape of a tensor value (after vocabulary stripping / reshaping), else None.
        vocab_rows: rows to keep of a padded vocabulary tensor, else None.
        group: index into ``optimizer_state_dict.state`` (ZeRO-3 step) or into
            ``param_groups`` (``param_group`` values), else None.
        key: the ``param_groups`` key of a ``param_group`` value.
    """

    param: str
    state: str
    relpath: str
    shape: tuple[int, ...] | None = None
    vocab_rows: int | None = None
    group: int | None = None
    key: str | None = None


@dataclass
class _UniversalIndex:
    """``Metadata.storage_data`` of this reader: the resolved root and one source per key."""

    root: Store
    sources: dict[str, _Source] = field(default_factory=dict)


class _DeepSpeedObject:
    """Inert stand-in for a DeepSpeed class found in a checkpoint (never executed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<DeepSpeed {type(self).__qualname__} stand-in>"


_STAND_INS: dict[str, type] = {}


def _stand_in(global_name: str) -> type:
    cls = _STAND_INS.get(global_name)
    if cls is None:
        module, _, name = global_name.rpartition(".")
        cls = type(name, (_DeepSpeedObject,), {"__module__": module, "__qualname__": name})
        _STAND_INS[global_name] = cls
    return cls


def _torch_load(source: Any, *, shapes_only: bool = False) -> Any:
    """``torch.load(weights_only=True)`` that tolerates DeepSpeed's own pickled objects.

    ``source`` is a local path (memory-mapped: only the bytes later touched are read) or a
    seekable binary file. ``shapes_only`` reads no tensor bytes from a file object either (the
    tensors come back uninitialised); it needs nothing for a local path, which is mapped.
    """
    is_path = isinstance(source, (str, os.PathLike))

    def load() -> Any:
        kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
        if is_path:
            try:
                return torch.load(source, mmap=True, **kwargs)
            except RuntimeError as e:  # a legacy (non-zip) file cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(source, **kwargs)
        source.seek(0)
        if shapes_only:
            with torch.serialization.skip_data():
                return torch.load(source, **kwargs)
        return torch.load(source, **kwargs)

    try:
        return load()
    except pickle.UnpicklingError as e:
        if not is_path:
            source.seek(0)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        if not unsafe:
            raise
        foreign = [name for name in unsafe if not name.startswith("deepspeed.")]
        if foreign:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {source}: it needs non-tensor globals {foreign}"
            ) from e
        with torch.serialization.safe_globals([(_stand_in(n), n) for n in unsafe]):
            return load()


def _tensor_of(value: Any) -> torch.Tensor | None:
    if isinstance(value, dict):
        value = value.get("param")
    return value if isinstance(value, torch.Tensor) else None


def _tensor_md(shape: tuple[int, ...], dtype: torch.dtype) -> TensorStorageMetadata:
    size = torch.Size(shape)
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=dtype),
        size=size,
        chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)],
    )


class DeepSpeedUniversalReader(IndexedReader):
    """A DCP ``StorageReader`` over a DeepSpeed universal checkpoint folder.

    Use::

        state = {"model": model_sd, "optim": optim_sd}  # from get_state_dict(model, optim)
        dcp.load(state, storage_reader=DeepSpeedUniversalReader(path),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optim, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    Args:
        path: the ``ds_to_universal`` output folder (holding ``zero/``), or the folder holding
            ``latest_universal``; a local path or any fsspec URL.
        model_prefix: key under which the model state dict sits in the loaded state.
        optim_prefix: key under which the optimizer state dict sits.
        step_as: ``"tensor"`` (default) or ``"float"``: how the Adam step is offered.
        load_param_groups: also offer ``<optim_prefix>.param_groups.<i>.<key>`` from
            DeepSpeed's ``param_groups`` (off by default; see the module docstring).
        **storage_options: passed to fsspec (``endpoint_url=`` ...).

    The reader keeps only plain values (path, options, the small index built by
    ``read_metadata``), so it pickles.
    """

    index_type = _UniversalIndex

    def __init__(
        self,
        path: str | os.PathLike,
        model_prefix: str = "model",
        optim_prefix: str = "optim",
        *,
        step_as: str = "tensor",
        load_param_groups: bool = False,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        if step_as not in ("tensor", "float"):
            raise ValueError(f"step_as must be 'tensor' or 'float', not {step_as!r}")  # a usage error
        self.path = os.fspath(path)
        self.model_prefix = model_prefix
        self.optim_prefix = optim_prefix
        self.step_as = step_as
        self.load_param_groups = load_param_groups
        self.storage_options = dict(storage_options)
        self._index: _UniversalIndex | None = None

    # ---------------------------------------------------------------- StorageReader API

    def reset(self, checkpoint_id: str | os.PathLike | None = None, **kwargs: Any) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._index = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike, **kwargs: Any) -> bool:
        try:
            store = open_store(checkpoint_id)
            return store.is_dir(ZERO_DIR) or store.is_file(LATEST_FILE)
        except Exception:  # noqa: BLE001 - "is this mine?": anything unreadable is not
            return False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Index the universal checkpoint: one whole-tensor chunk per key."""
        root = self._resolve_root()
        index = _UniversalIndex(root=root)
        state_md: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}

        files_by_param = self._list_param_files(root)
        model_states = self._model_states(root)
        param_shapes: dict[str, tuple[int, ...]] = {}
        group_of: dict[str, int] = {}
        for group_id, shapes in enumerate(model_states.get("param_shapes") or []):
            for name, shape in shapes.items():
                param_shapes[name] = tuple(int(d) for d in shape)
                group_of[name] = group_id
        uc_info = model_states.get("universal_checkpoint_info") or {}
        vocab_size = uc_info.get("original_vocab_size")
        has_optimizer_file = root.is_file(f"{ZERO_DIR}/{OPTIMIZER_STATE_FILE}")

        for name in sorted(set(files_by_param) | set(param_shapes)):
            present = files_by_param.get(name, set())
            shape, dtype, vocab_rows = self._peek_shape(root, name, present, param_shapes.get(name), vocab_size)
            trainable = name in param_shapes or bool(present - {"fp32.pt"})
            for state in TENSOR_STATES if trainable else ("fp32",):
                fqn = self._fqn(name, state)
                relpath = f"{ZERO_DIR}/{name}/{state}.pt"
                index.sources[fqn] = _Source(name, state, relpath, shape, vocab_rows)
                state_md[fqn] = _tensor_md(shape, dtype)
            if trainable:
                fqn = self._fqn(name, STEP_STATE)
                if "step.pt" in present or not has_optimizer_file:
                    source = _Source(name, STEP_STATE, f"{ZERO_DIR}/{name}/step.pt")
                else:  # ZeRO-3: the step sits in rank 0's optimizer state dict
                    source = _Source(
                        name,
                        STEP_STATE,
                        f"{ZERO_DIR}/{OPTIMIZER_STATE_FILE}",
                        group=group_of.get(name, 0),
                    )
                index.sources[fqn] = source
                state_md[fqn] = (
                    _tensor_md((), torch.float32)
                    if self.step_as == "tensor"
                    else BytesStorageMetadata()
                )

        if self.load_param_groups and has_optimizer_file:
            relpath = f"{ZERO_DIR}/{OPTIMIZER_STATE_FILE}"
            common = self._load(root, relpath, shapes_only=True)
            for group_id, group in enumerate(common.get("param_groups") or []):
                for key in group:
                    if key == "params":
                        continue
                    fqn = f"{self.optim_prefix}.param_groups.{group_id}.{key}"
                    index.sources[fqn] = _Source(
                        "", "param_group", relpath, group=group_id, key=key
                    )
                    state_md[fqn] = BytesStorageMetadata()

        if not index.sources:
            raise CheckpointNotFoundError(
                f"DeepSpeed universal checkpoint {self.path!r}: no parameters found under "
                f"{root.describe(ZERO_DIR)}"
            )
        self._index = index
        return Metadata(
            state_dict_metadata=state_md,
            storage_data=index,
            storage_meta=StorageMeta(checkpoint_id=root.url),
        )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner, **kwargs: Any) -> Future[None]:
        """Serve every read item, one file at a time in sorted order."""
        index = self._loaded_index()
        by_file: dict[str, list[tuple[ReadItem, _Source]]] = defaultdict(list)
        for item in plan.items:
            source = index.sources.get(item.storage_index.fqn)
            if source is None:
                raise CheckpointError(
                    f"DeepSpeed universal checkpoint {self.path!r} has no key "
                    f"{item.storage_index.fqn!r}"
                )
            by_file[source.relpath].append((item, source))

        for relpath in sorted(by_file):
            items = by_file[relpath]
            loaded = self._load(index.root, relpath, needed_by=items)
            for item, source in items:
                if item.type == LoadItemType.BYTE_IO:
                    buffer = io.BytesIO()
                    torch.save(self._value(source, loaded, item.storage_index.fqn), buffer)
                    buffer.seek(0)
                    planner.load_bytes(item, buffer)
                    continue
                src = self._tensor(source, loaded, item.storage_index, index.root)
                src = narrow(src, item.storage_offsets, item.lengths)
                target = planner.resolve_tensor(item).detach()
                if target.size() != src.size():
                    raise CorruptCheckpointError(
                        f"{item.storage_index.fqn}: target region {tuple(target.size())} does not "
                        f"match the checkpoint region {tuple(src.size())} read from {relpath}"
                    )
                target.copy_(src)
                planner.commit_tensor(item, target)
            del loaded

        future: Future[None] = Future()
        future.set_result(None)
        return future

    # ---------------------------------------------------------------- helpers

    def _fqn(self, name: str, state: str) -> str:
        if state == "fp32":
            return f"{self.model_prefix}.{name}"
        return f"{self.optim_prefix}.state.{name}.{state}"

    def _resolve_root(self) -> Store:
        """The folder holding ``zero/``: the given one, or the one ``latest_universal`` names."""
        store = open_store(self.path, self.storage_options)
        if store.is_dir(ZERO_DIR):
            return store
        if store.is_file(LATEST_FILE):
            tag = store.read_bytes(LATEST_FILE, 4096).decode(errors="replace").strip()
            candidate = store.child(tag)
            if candidate.is_dir(ZERO_DIR):
                return candidate
            raise CheckpointNotFoundError(
                f"DeepSpeed universal checkpoint {self.path!r}: {LATEST_FILE} names {tag!r}, "
                f"but {candidate.describe(ZERO_DIR)} does not exist"
            )
        if not store.exists(""):
            raise CheckpointNotFoundError(f"DeepSpeed universal checkpoint {self.path!r} does not exist")
        raise CheckpointNotFoundError(
            f"{self.path!r} is not a DeepSpeed universal checkpoint: expected a "
            f"{ZERO_DIR}/ folder (ds_to_universal output) or a {LATEST_FILE} file in it"
        )

    def _list_param_files(self, root: Store) -> dict[str, set[str]]:
        files: dict[str, set[str]] = defaultdict(set)
        for rel in root.find(ZERO_DIR):
            rel = rel[len(ZERO_DIR) + 1 :] if rel.startswith(ZERO_DIR + "/") else rel
            name, _, filename = rel.rpartition("/")
            if name and "/" not in name and filename in _PARAM_FILES:
                files[name].add(filename)
        return dict(files)

    def _model_states(self, root: Store) -> dict[str, Any]:
        """The first non-expert model-states file (without its tensor bytes), or {}."""
        candidates = sorted(
            posixpath.basename(p) for p in root.glob("*model_states.pt") if "expert" not in posixpath.basename(p)
        )
        if not candidates:
            return {}
        preferred = [c for c in candidates if c.startswith("mp_rank_")] or candidates
        loaded = self._load(root, preferred[0], shapes_only=True)
        return loaded if isinstance(loaded, dict) else {}

    def _peek_shape(
        self,
        root: Store,
        name: str,
        present: set[str],
        recorded: tuple[int, ...] | None,
        vocab_size: int | None,
    ) -> tuple[tuple[int, ...], torch.dtype, int | None]:
        """Final shape, dtype and vocabulary rows of a parameter, reading no tensor bytes."""
        for state in TENSOR_STATES:
            if f"{state}.pt" not in present:
                continue
            relpath = f"{ZERO_DIR}/{name}/{state}.pt"
            loaded = self._load(root, relpath, shapes_only=True)
            tensor = _tensor_of(loaded)
            if tensor is None:
                raise CorruptCheckpointError(
                    f"{root.describe(relpath)}: expected a tensor or a dict with a "
                    f"'param' tensor, found {type(loaded).__name__}"
                )
            shape = tuple(tensor.shape)
            vocab_rows = None
            if (
                isinstance(loaded, dict)
                and loaded.get("vocab_tensor")
                and vocab_size is not None
                and shape
                and shape[0] > int(vocab_size)
            ):
                vocab_rows = int(vocab_size)
                shape = (vocab_rows, *shape[1:])
            if recorded is not None and shape != recorded and len(shape) == 1:
                # ZeRO-3 writes flat tensors; the model-states file records the real shape.
                if math.prod(recorded) != shape[0]:
                    raise CorruptCheckpointError(
                        f"{root.describe(relpath)}: flat tensor of {shape[0]} elements "
                        f"cannot take the shape {recorded} recorded for {name!r} in param_shapes"
                    )
                shape = recorded
            return shape, tensor.dtype, vocab_rows
        if recorded is None:  # unreachable: names come from files or param_shapes
            raise CheckpointNotFoundError(f"{name!r}: no tensor file under {ZERO_DIR}/{name}/")
        return recorded, torch.float32, None

    def _load(
        self,
        root: Store,
        relpath: str,
        *,
        shapes_only: bool = False,
        needed_by: list[tuple[ReadItem, _Source]] | None = None,
    ) -> Any:
        try:
            local = root.local_file(relpath)
            if local is not None:
                return _torch_load(local, shapes_only=shapes_only)
            with root.open_read(relpath) as f:
                return _torch_load(f, shapes_only=shapes_only)
        except FileNotFoundError:
            if not needed_by:
                raise CheckpointNotFoundError(f"{root.describe(relpath)} does not exist") from None
            wanted = ", ".join(
                f"{item.storage_index.fqn!r} ({source.state} of parameter {source.param!r})"
                if source.param
                else repr(item.storage_index.fqn)
                for item, source in needed_by
            )
            raise CheckpointNotFoundError(
                f"DeepSpeed universal checkpoint {self.path!r}: missing file {root.describe(relpath)}, "
                f"expected to hold {wanted}"
            ) from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # not a torch.save file
            raise CorruptCheckpointError(f"cannot read {root.describe(relpath)}: {e}") from e

    def _tensor(
        self, source: _Source, loaded: Any, where: MetadataIndex, root: Store
    ) -> torch.Tensor:
        path = root.describe(source.relpath)
        if source.state == STEP_STATE:
            value = self._step(source, loaded, where.fqn, path)
            return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        tensor = _tensor_of(loaded)
        if tensor is None:
            raise CorruptCheckpointError(f"{where.fqn}: {path} holds no tensor ({type(loaded).__name__})")
        if source.vocab_rows is not None and tensor.size(0) > source.vocab_rows:
            tensor = tensor.narrow(0, 0, source.vocab_rows)
        assert source.shape is not None
        if tuple(tensor.shape) != source.shape:
            if tensor.numel() != math.prod(source.shape):
                raise CorruptCheckpointError(
                    f"{where.fqn}: {path} holds a tensor of shape {tuple(tensor.shape)}, "
                    f"expected {source.shape}"
                )
            tensor = tensor.reshape(source.shape)
        return tensor

    def _step(self, source: _Source, loaded: Any, fqn: str, path: str) -> Any:
        if source.relpath.endswith(f"/{OPTIMIZER_STATE_FILE}"):
            try:
                value = loaded["optimizer_state_dict"]["state"][source.group]["step"]
            except (KeyError, IndexError, TypeError):
                raise CorruptCheckpointError(
                    f"{fqn}: no step for parameter {source.param!r}: neither "
                    f"{ZERO_DIR}/{source.param}/step.pt nor an Adam step in {path} "
                    f"(optimizer_state_dict.state[{source.group}].step)"
                ) from None
        else:
            value = loaded
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise CorruptCheckpointError(f"{fqn}: step in {path} has {value.numel()} elements")
        return value

    def _value(self, source: _Source, loaded: Any, fqn: str) -> Any:
        if source.state == "param_group":
            return loaded["param_groups"][source.group][source.key]
        if source.state == STEP_STATE:
            value = self._step(source, loaded, fqn, source.relpath)
            return float(value.item() if isinstance(value, torch.Tensor) else value)
        raise CheckpointError(f"{fqn}: a tensor value was planned as bytes")
