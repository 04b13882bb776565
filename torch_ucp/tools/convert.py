"""Any checkpoint torch_ucp reads, rewritten as a torch_ucp checkpoint (``torch-ucp convert``).

The source may be a stock DCP checkpoint, a DeepSpeed universal checkpoint, Hugging Face
safetensors weights or a torch_ucp checkpoint (rewritten with one fragment per tensor). The
destination is written with :class:`~torch_ucp.storage.builder.CheckpointBuilder`: raw bytes,
block checksums, ``.metadata`` committed last and atomically, so a failed conversion leaves no
checkpoint there (and an earlier one, with ``overwrite``, stays loadable until the commit).
Tensors are read whole one at a time and written as they come: peak host memory stays near the
largest tensor. Keys, nested-state-dict paths and, where the source records them, the mesh and
placements each tensor was saved from are kept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch_ucp.errors import CheckpointExistsError, OptionError
from torch_ucp.storage.builder import CheckpointBuilder
from torch_ucp.storage.commit import EXISTS
from torch_ucp.storage.urls import same_location
from torch_ucp.tools.export import ExportPlan, Progress, plan_export
from torch_ucp.tools.sources import CheckpointSource

__all__ = ["ConvertResult", "convert_checkpoint"]


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote.

    Attributes:
        source_format: the source checkpoint's format (one of ``tools.FORMATS``).
        dst: the torch_ucp checkpoint written.
        save_id: its save id.
        tensors / values: the number of tensors and non-tensor values written.
        nbytes: the tensors' bytes.
    """

    source_format: str
    dst: str
    save_id: str
    tensors: int
    values: int
    nbytes: int


def convert_checkpoint(
    source: str | os.PathLike | CheckpointSource | ExportPlan,
    dst: str,
    *,
    keys: Sequence[str] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Write the checkpoint ``source`` (any format) as the torch_ucp checkpoint ``dst``.

    Args:
        source: a checkpoint URL, an opened :class:`~torch_ucp.tools.CheckpointSource`, or an
            :class:`~torch_ucp.tools.ExportPlan` without renames or casts (then ``keys`` stays
            unset).
        dst: the torch_ucp checkpoint to write: path or fsspec URL, not the source itself.
        keys: shell-style patterns; only keys matching one of them are converted.
        overwrite: replace a committed checkpoint at ``dst`` (it stays loadable until the new
            one commits).
        storage_options: fsspec options for ``source`` and ``dst``.
        trust_pickle: unpickle what the source stores as pickle (a stock DCP ``.metadata``,
            values saved with ``torch.save``); such values without a pickle-free encoding stay
            pickled in ``dst``.
        progress: called with the bytes of each tensor once written.

    Raises:
        OptionError: ``dst`` is the source, or no key matches ``keys``.
        CheckpointExistsError: ``dst`` holds a committed checkpoint and ``overwrite`` is not set.
        CheckpointError: the source cannot be read.
    """
    options = dict(storage_options or {})
    if isinstance(source, ExportPlan):
        url = source.source.url
    elif isinstance(source, CheckpointSource):
        url = source.url
    else:
        url = os.fspath(source)
    if same_location(url, dst):
        raise OptionError("the source and {option} are the same; convert into a new folder", "dst")
    if isinstance(source, ExportPlan):
        if keys is not None:
            raise TypeError("keys belongs to plan_export when an ExportPlan is given")
        if any(it.name != it.key or it.dtype != it.info.dtype for it in source.tensors):
            raise ValueError("convert_checkpoint keeps keys and dtypes: plan without strip_prefix or dtype")
        plan = source
    else:
        plan = plan_export(source, keys=keys, storage_options=options, trust_pickle=trust_pickle)
    try:
        builder = CheckpointBuilder(dst, overwrite=overwrite, allow_pickle=trust_pickle, **options)
    except CheckpointExistsError:
        raise CheckpointExistsError(
            f"{EXISTS}: {dst} already holds a committed checkpoint; pass overwrite=True to replace it"
        ) from None
    with builder:
        for item in plan.tensors:
            info = item.info
            tensor = plan.source.read_tensor(item.key)
            builder.add_tensor(item.key, tensor, path=info.path, mesh=info.mesh, placements=info.placements)
            del tensor
            if progress is not None:
                progress(item.nbytes)
        for _, key in plan.values:
            builder.add_value(key, plan.source.read_value(key), path=plan.source.values[key].path)
    return ConvertResult(
        plan.source.format, dst, builder.save_id, len(plan.tensors), len(plan.values), plan.nbytes
    )
