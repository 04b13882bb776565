"""Checkpoint management for a run folder of ``step-N`` checkpoints on any fsspec URL.

A run folder holds one checkpoint per saved step (``s3://bucket/run/step-100``, as TorchTitan
lays them out). A step folder is *committed* once its ``.metadata`` exists: torch_ucp writes it
last and atomically, after every rank's data. A step folder without it is *incomplete*: a save
still in progress, whose data may be arriving right now, or one that failed.

::

    latest = torch_ucp.latest_checkpoint("s3://bucket/run", endpoint_url=...)
    if latest is not None:
        torch_ucp.load(state, latest.url, endpoint_url=...)
    ...
    torch_ucp.save(state, f"s3://bucket/run/step-{step}", endpoint_url=...)
    torch_ucp.prune_checkpoints("s3://bucket/run", keep=3, endpoint_url=...)

:func:`prune_checkpoints` deletes only committed checkpoints older than the ``keep`` newest
committed ones, so there is always a newer committed checkpoint than any it deletes, and it
never touches an incomplete step folder (it cannot tell a failed save from one in progress).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from torch_ucp.errors import CheckpointError
from torch_ucp.metadata.schema import METADATA_FILE
from torch_ucp.storage.reader import load_metadata
from torch_ucp.storage.store import Store, open_store

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"
_STEP = re.compile(rf"^{re.escape(STEP_PREFIX)}(\d+)$")


@dataclass(frozen=True)
class StepCheckpoint:
    """One ``step-N`` folder of a run.

    Attributes:
        step: N.
        name: the folder's name as written (``step-100``, or ``step-000100``).
        url: the checkpoint's URL (what ``torch_ucp.load`` takes).
        committed: its ``.metadata`` exists; ``False``: a save in progress or a failed one.
        save_id / world_size / created / nbytes: from the committed metadata (``None`` when
            incomplete, not read, or unreadable): the save's id, ranks that saved it, save
            time (seconds since the epoch) and bytes of tensor data.
        error: why committed metadata could not be read (e.g. not a torch_ucp checkpoint).
    """

    step: int
    name: str
    url: str
    committed: bool
    save_id: str | None = None
    world_size: int | None = None
    created: float | None = None
    nbytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Summary:
    save_id: str
    world_size: int
    created: float
    nbytes: int


def _summary(store: Store) -> _Summary:
    """What listing shows of a committed checkpoint: all it needs from the metadata."""
    meta = load_metadata(store)
    return _Summary(meta.save_id, meta.world_size, meta.created, meta.total_tensor_bytes)


def _step_folders(run: Store) -> list[tuple[int, str]]:
    """``(N, name)`` of every ``step-N`` entry of the run folder, by step."""
    steps = []
    for name in run.list_dir(""):
        m = _STEP.match(name)
        if m is not None:
            steps.append((int(m.group(1)), name))
    return sorted(steps)


def _describe(run: Store, step: int, name: str, read_metadata: bool) -> StepCheckpoint:
    url = run.describe(name)
    store = open_store(url, run.storage_options)
    if not store.exists(METADATA_FILE):
        return StepCheckpoint(step, name, url, committed=False)
    if not read_metadata:
        return StepCheckpoint(step, name, url, committed=True)
    try:
        s = _summary(store)
    except CheckpointError as e:
        return StepCheckpoint(step, name, url, committed=True, error=str(e))
    return StepCheckpoint(step, name, url, True, s.save_id, s.world_size, s.created, s.nbytes)


def list_checkpoints(
    run_url: str | os.PathLike, *, read_metadata: bool = True, **storage_options: Any
) -> list[StepCheckpoint]:
    """Every ``step-N`` folder under ``run_url``, committed or not, by step.

    ``read_metadata=False`` only checks which are committed (one existence check each).
    An absent run folder has no checkpoints.
    """
    run = open_store(run_url, storage_options)
    return [_describe(run, step, name, read_metadata) for step, name in _step_folders(run)]


def latest_checkpoint(run_url: str | os.PathLike, **storage_options: Any) -> StepCheckpoint | None:
    """The committed checkpoint of the highest step under ``run_url``, or ``None``.

    Incomplete step folders (a save in progress or a failed one) are passed over.
    """
    run = open_store(run_url, storage_options)
    for step, name in reversed(_step_folders(run)):
        found = _describe(run, step, name, read_metadata=True)
        if found.committed:
            return found
    return None


def prune_checkpoints(
    run_url: str | os.PathLike, keep: int, *, dry_run: bool = False, **storage_options: Any
) -> list[StepCheckpoint]:
    """Delete committed checkpoints older than the ``keep`` newest committed ones.

    Returns what was deleted (with ``dry_run``: what would be). Incomplete step folders are
    never deleted, whatever their step. Each checkpoint is uncommitted first (its
    ``.metadata`` removed), then its data: a reader never finds a committed checkpoint with
    data missing, and an interrupted prune leaves an incomplete folder, not a broken one.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the newest committed checkpoint), got {keep}")
    run = open_store(run_url, storage_options)
    committed = [c for c in list_checkpoints(run_url, read_metadata=False, **storage_options) if c.committed]
    doomed = committed[:-keep]
    for c in [] if dry_run else doomed:
        logger.info("torch_ucp: removing checkpoint %s (keeping the %d newest)", c.url, keep)
        run.remove(f"{c.name}/{METADATA_FILE}")
        run.remove(c.name)
    return doomed


__all__ = [
    "STEP_PREFIX",
    "StepCheckpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
]
