"""Exceptions raised by torch_ucp. Each message names the tensor, the object and what was expected."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every torch_ucp error."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (no metadata object) at the URL."""


class UnsupportedFormatError(CheckpointError):
    """The metadata is not a torch_ucp checkpoint, or of a format version this build cannot read."""


class CorruptCheckpointError(CheckpointError):
    """A data object is missing, truncated, or fails its checksum."""


class LoadPlanError(CheckpointError, ValueError):
    """The target state dict does not fit the checkpoint (missing/unexpected keys, shapes)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already lives at the URL and ``overwrite`` was not set."""


class UnsafeCheckpointError(CheckpointError):
    """Reading or writing this needs an explicit opt-in: a value stored with pickle
    (``allow_pickle=True``) or a data object that is a symbolic link (``follow_symlinks=True``)."""


class CommitConflictError(CheckpointError):
    """Another save committed at the URL while this one ran (or removed its data): nothing of
    this save was committed, and its own data was removed."""
