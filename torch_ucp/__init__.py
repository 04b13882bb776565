"""torch_ucp: universal checkpointing for PyTorch-native distributed training.

Save with ``dcp.save(state, storage_writer=UCPWriter(url), planner=UCPSavePlanner())``; load
into any DeviceMesh, world size, or a plain process with ``dcp.load(..., storage_reader=
UCPReader(url), planner=UCPLoadPlanner())`` or :func:`open_checkpoint`. Save in the
background with :func:`async_save` (:mod:`torch_ucp.asynchronous`) and :func:`wait` for it.
Export any checkpoint as safetensors or one ``torch.save`` file with :func:`export_safetensors` /
:func:`export_torch`, or rewrite it as a torch_ucp checkpoint with :func:`convert_checkpoint`
(:mod:`torch_ucp.tools`).
"""

from torch_ucp import knobs as _knobs
from torch_ucp.api import load, save
from torch_ucp.asynchronous import AsyncSaveHandle, AsyncSaver, async_save, wait
from torch_ucp.checkpoint import Checkpoint, open_checkpoint
from torch_ucp.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CommitConflictError,
    ContentMismatchError,
    CorruptCheckpointError,
    KeyNotFoundError,
    LoadPlanError,
    OptionError,
    PatternError,
    SavePlanError,
    SharedReadError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    rank_error,
)
from torch_ucp.management import (
    StepCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
)
from torch_ucp.planner import UCPLoadPlanner, UCPSavePlanner
from torch_ucp.storage import UCPReader, UCPWriter
from torch_ucp.tools import convert_checkpoint, export_safetensors, export_torch

if _knobs.explain_stock_readers():
    from torch_ucp.interop import stock_readers as _stock_readers

    _stock_readers.install()

__version__ = "0.1.0"

__all__ = [
    "AsyncSaveHandle",
    "AsyncSaver",
    "async_save",
    "Checkpoint",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CommitConflictError",
    "ContentMismatchError",
    "CorruptCheckpointError",
    "KeyNotFoundError",
    "LoadPlanError",
    "NotStockCheckpointError",
    "OptionError",
    "PatternError",
    "SavePlanError",
    "SharedReadError",
    "UCPLoadPlanner",
    "UCPReader",
    "UCPSavePlanner",
    "UCPWriter",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "open_checkpoint",
    "wait",
    "load",
    "save",
    "rank_error",
    "StepCheckpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "convert_checkpoint",
    "export_safetensors",
    "export_torch",
]
