"""Consolidated full tensors of any checkpoint as safetensors or one ``torch.save`` file.

:func:`export_safetensors` writes Hugging Face weights (``model.safetensors``, or with
``max_shard_size`` the sharded ``model-0000i-of-0000N.safetensors`` files plus
``model.safetensors.index.json``); :func:`export_torch` writes one flat ``{key: tensor or value}``
file for ``torch.load``. Either reads each tensor whole (from all its fragments or chunks),
optionally casts it, writes it and releases it before reading the next, so peak host memory
stays near the largest tensor, not the model. The source is any checkpoint
:func:`~torch_ucp.tools.open_source` reads (torch_ucp, stock DCP, DeepSpeed universal,
safetensors). ``torch-ucp export`` is a command line over these functions.

:func:`plan_export` says what an export will write (names, dtypes, sizes) without reading any
tensor; both functions take its result in place of a URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torch_ucp import _compat
from torch_ucp.errors import OptionError
from torch_ucp.interop.safetensors import INDEX_NAME, SINGLE_NAME, safetensors_dtype_name
from torch_ucp.metadata.raw_bytes import tensor_bytes
from torch_ucp.sizes import parse_size
from torch_ucp.storage.store import Store, open_store
from torch_ucp.storage.urls import is_local_url, local_path, split_url
from torch_ucp.tools.safetensors_writer import SafetensorsFileWriter
from torch_ucp.tools.sources import CheckpointSource, TensorInfo, open_source, select_keys

__all__ = [
    "TORCH_NAME",
    "ExportItem",
    "ExportPlan",
    "ExportResult",
    "export_safetensors",
    "export_torch",
    "plan_export",
    "shard",
]

logger = logging.getLogger(__name__)

TORCH_NAME = "model.pt"
"""The file :func:`export_torch` writes into an output folder."""

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

Progress = Callable[[int], Any]
"""Called with the bytes of each tensor once it is written."""


@dataclass(frozen=True)
class ExportItem:
    """One tensor to export: its output name, source key, output dtype and shape."""

    name: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    info: TensorInfo = field(repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ExportPlan:
    """What an export writes, decided from the source's metadata alone (:func:`plan_export`).

    Attributes:
        source: the checkpoint read.
        tensors: the tensors, in the source's key order.
        values: the non-tensor values as ``(output name, source key)``.
    """

    source: CheckpointSource
    tensors: list[ExportItem]
    values: list[tuple[str, str]]

    @property
    def nbytes(self) -> int:
        """The bytes of all tensors, in their output dtypes."""
        return sum(it.nbytes for it in self.tensors)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        source_format: the source checkpoint's format (one of ``tools.FORMATS``).
        out: the output folder (safetensors) or file (torch, after ``model.pt`` is added to a
            folder).
        files: the files written, relative to ``out``'s folder; ``[]`` for a torch export
            (``out`` is the file).
        tensors: the number of tensors written.
        nbytes: their bytes.
        values: the non-tensor values written (torch) or skipped (safetensors holds tensors
            only), by output name.
    """

    source_format: str
    out: str
    files: list[str]
    tensors: int
    nbytes: int
    values: list[str]


def plan_export(
    source: str | os.PathLike | CheckpointSource,
    *,
    keys: Sequence[str] | None = None,
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> ExportPlan:
    """Which tensors and values an export of ``source`` writes, under which names and dtypes.

    Args:
        source: a checkpoint URL (any format :func:`~torch_ucp.tools.open_source` reads) or an
            opened source.
        keys: shell-style patterns; only keys matching one of them are exported (all keys when
            ``None``). Matched before ``strip_prefix``.
        strip_prefix: removed from the start of every key that has it (``"model."`` for Hugging
            Face names); keys without it keep their name.
        dtype: a floating-point dtype every floating-point tensor is cast to (integer and bool
            tensors keep theirs).
        storage_options / trust_pickle: as for :func:`~torch_ucp.tools.open_source`.

    Raises:
        OptionError: no key matches ``keys``, ``strip_prefix`` empties a key or makes two keys
            one, or ``dtype`` is not floating-point.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise OptionError(f"{{option}} must be a floating-point torch.dtype, got {dtype!r}", "dtype")
    if not isinstance(source, CheckpointSource):
        source = open_source(source, storage_options, trust_pickle=trust_pickle)
    selected = select_keys(source.keys(), keys)
    if not selected:
        raise OptionError(f"no key of {source.url} matches {{option}}", "keys", list(keys or []))
    names: dict[str, str] = {}

    def rename(key: str) -> str:
        name = key
        if strip_prefix and key.startswith(strip_prefix):
            name = key[len(strip_prefix) :]
            if not name:
                raise OptionError(f"{{option}} leaves key {key!r} empty", "strip_prefix", strip_prefix)
        other = names.setdefault(name, key)
        if other != key:
            raise OptionError(
                f"keys {other!r} and {key!r} both become {name!r} with {{option}}", "strip_prefix", strip_prefix
            )
        return name

    tensors, values = [], []
    for key in selected:
        info = source.tensors.get(key)
        if info is not None:
            out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            tensors.append(ExportItem(rename(key), key, out_dtype, info.shape, info))
        else:
            values.append((rename(key), key))
    return ExportPlan(source, tensors, values)


def shard(items: Sequence[ExportItem], max_bytes: int | None) -> list[list[ExportItem]]:
    """Greedy, in key order, as Hugging Face shards: a new file when the next tensor would
    push the current one past ``max_bytes`` (a larger tensor gets a file of its own)."""
    if max_bytes is None:
        return [list(items)]
    shards: list[list[ExportItem]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def export_safetensors(
    source: str | os.PathLike | CheckpointSource | ExportPlan,
    out: str,
    *,
    keys: Sequence[str] | None = None,
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the tensors of ``source`` as Hugging Face safetensors, one tensor in memory at a time.

    ``out`` is a folder (local or any fsspec URL) receiving ``model.safetensors``, or with
    ``max_shard_size`` the sharded layout ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` (``weight_map`` and ``metadata.total_size``); an ``out``
    ending in ``.safetensors`` is written as that one file. Every file carries
    ``{"format": "pt"}`` metadata. Non-tensor values are skipped (and listed in the result):
    safetensors holds tensors only. A failed export removes the files it wrote.

    Args:
        source: a checkpoint URL, an opened :class:`~torch_ucp.tools.CheckpointSource`, or an
            :class:`ExportPlan` (then ``keys``, ``strip_prefix`` and ``dtype`` stay unset).
        out: the output folder or ``.safetensors`` file.
        keys / strip_prefix / dtype: which tensors, under which names and dtypes
            (:func:`plan_export`).
        max_shard_size: split into files of at most this many bytes (an int, or ``"5GB"``,
            ``"500MB"``, ``"1GiB"``).
        overwrite: replace existing output files (stale shards of an earlier export are
            removed); without it, existing ones are an error.
        storage_options: fsspec options for ``source`` and ``out``.
        trust_pickle: as for :func:`~torch_ucp.tools.open_source`.
        progress: called with the bytes of each tensor once written.

    Raises:
        OptionError: a bad argument, an output that exists without ``overwrite``, or a tensor
            whose dtype safetensors cannot hold.
        CheckpointError: the source cannot be read.
    """
    options = dict(storage_options or {})
    plan = _plan(source, keys, strip_prefix, dtype, options, trust_pickle)
    max_bytes = _max_shard_bytes(max_shard_size)
    for it in plan.tensors:
        try:
            safetensors_dtype_name(it.dtype)
        except ValueError as e:
            raise OptionError(f"{it.key}: {e}; use the torch format or {{option}} to leave it out", "keys") from None
    store, files, index_name = _safetensors_outputs(out, plan.tensors, max_bytes, overwrite, options)
    written: list[str] = []
    try:
        for name, members in files:
            layout = [(it.name, it.dtype, it.shape) for it in members]
            with SafetensorsFileWriter(store, name, layout, {"format": "pt"}) as writer:
                for item in members:
                    tensor = _read(plan.source, item)
                    writer.write(item.name, tensor)
                    del tensor
                    if progress is not None:
                        progress(item.nbytes)
            written.append(name)
        if index_name is not None:
            index = {
                "metadata": {"total_size": plan.nbytes},
                "weight_map": {it.name: name for name, members in files for it in members},
            }
            store.write_atomic(index_name, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
            written.append(index_name)
    except BaseException:
        for name in written:  # a partial export is not left looking complete
            try:
                store.remove(name)
            except Exception:  # noqa: BLE001 - best effort; the original error is raised
                pass
        raise
    return ExportResult(
        plan.source.format, out, written, len(plan.tensors), plan.nbytes, [name for name, _ in plan.values]
    )


def export_torch(
    source: str | os.PathLike | CheckpointSource | ExportPlan,
    out: str,
    *,
    keys: Sequence[str] | None = None,
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``source`` as one ``torch.save`` file of ``{name: tensor or value}``, flat, for
    ``torch.load(out, weights_only=True)``, one tensor in memory at a time.

    ``out`` is a local file (a folder gets ``model.pt``). Non-tensor values are kept. The file
    is laid out first with empty tensor records (``torch.save`` of shape-only tensors), then
    each tensor's bytes are written into its record: the result is the file ``torch.save``
    writes. Only if a non-tensor value itself holds tensors is the whole state held in memory
    for one plain ``torch.save`` (logged as a warning). The file appears whole or not at all
    (written aside, then renamed).

    Arguments as for :func:`export_safetensors` (``storage_options`` apply to ``source``).

    Raises:
        OptionError: a bad argument, a non-local ``out``, or an ``out`` that exists without
            ``overwrite``.
        CheckpointError: the source cannot be read.
    """
    if not is_local_url(out):
        raise OptionError("a torch export writes a local file; {option} must be a local path", "out")
    path = local_path(out)
    if os.path.isdir(path) or path.endswith(os.sep):
        path = os.path.join(path, TORCH_NAME)
    if os.path.exists(path) and not overwrite:
        raise OptionError(f"{path} exists; pass {{option}} to replace it", "overwrite", True)
    plan = _plan(source, keys, strip_prefix, dtype, dict(storage_options or {}), trust_pickle)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    values = {name: plan.source.read_value(key) for name, key in plan.values}
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        offsets = _compat.save_skeleton(tmp, {it.name: (it.shape, it.dtype) for it in plan.tensors}, values)
        if offsets is None:
            logger.warning(
                "torch_ucp: a non-tensor value holds tensors: holding the whole state in memory for torch.save"
            )
            state: dict[str, Any] = {}
            for it in plan.tensors:
                state[it.name] = _read(plan.source, it)
                if progress is not None:
                    progress(it.nbytes)
            state.update(values)
            torch.save(state, tmp)
        else:
            _fill_records(tmp, plan, offsets, progress)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return ExportResult(plan.source.format, path, [], len(plan.tensors), plan.nbytes, list(values))


# -- helpers ----------------------------------------------------------------------------------
def _plan(
    source: str | os.PathLike | CheckpointSource | ExportPlan,
    keys: Sequence[str] | None,
    strip_prefix: str | None,
    dtype: torch.dtype | None,
    storage_options: dict[str, Any],
    trust_pickle: bool,
) -> ExportPlan:
    if not isinstance(source, ExportPlan):
        return plan_export(
            source, keys=keys, strip_prefix=strip_prefix, dtype=dtype,
            storage_options=storage_options, trust_pickle=trust_pickle,
        )
    if keys is not None or strip_prefix is not None or dtype is not None:
        raise TypeError("keys, strip_prefix and dtype belong to plan_export when an ExportPlan is given")
    return source


def _max_shard_bytes(max_shard_size: int | str | None) -> int | None:
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, str):
        try:
            return parse_size(max_shard_size)
        except ValueError as e:
            raise OptionError(f"{{option}}: {e}", "max_shard_size") from None
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise OptionError(f"{{option}} must be a positive number of bytes, got {max_shard_size!r}", "max_shard_size")
    return max_shard_size


def _safetensors_outputs(
    out: str,
    items: list[ExportItem],
    max_bytes: int | None,
    overwrite: bool,
    options: dict[str, Any],
) -> tuple[Store, list[tuple[str, list[ExportItem]]], str | None]:
    """``(store, [(file, its tensors)], index file or None)``, after checking (and with
    ``overwrite`` removing) what ``out`` already holds."""
    if out.endswith(".safetensors"):
        if max_bytes is not None:
            raise OptionError("{option} needs an output folder, not a .safetensors file", "max_shard_size")
        parent, name = split_url(out)
        store = open_store(parent, options)
        if store.exists(name) and not overwrite:
            raise OptionError(f"{out} exists; pass {{option}} to replace it", "overwrite", True)
        return store, [(name, items)], None
    store = open_store(out, options)
    shards = shard(items, max_bytes)
    if len(shards) == 1:
        files, index_name = [(SINGLE_NAME, shards[0])], None
    else:
        n = len(shards)
        files = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]
        index_name = INDEX_NAME
    existing = sorted(
        name for name in store.list_dir("") if name in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.match(name)
    )
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise OptionError(f"{out} already holds {shown}; pass {{option}} to replace them", "overwrite", True)
    for name in existing:
        store.remove(name)
    store.makedirs("")
    return store, files, index_name


def _read(source: CheckpointSource, item: ExportItem) -> torch.Tensor:
    t = source.read_tensor(item.key)
    return t if t.dtype == item.dtype else t.to(item.dtype)


def _fill_records(path: str, plan: ExportPlan, offsets: dict[str, int], progress: Progress | None) -> None:
    """Write each tensor's bytes at its record's offset in the laid-out ``torch.save`` file."""
    fd = os.open(path, os.O_RDWR)
    try:
        for it in plan.tensors:
            tensor = _read(plan.source, it)
            data = tensor_bytes(tensor)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offsets[it.name] + done)
            del tensor, data
            if progress is not None:
                progress(it.nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)
