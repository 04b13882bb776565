"""``torch_ucp.save`` / ``torch_ucp.load``: ``dcp.save`` / ``dcp.load`` with torch_ucp's
writer, reader and planners, raising torch_ucp's own errors.

DCP wraps each rank's failure in ``CheckpointException``, a ``BaseException`` that
``except torch_ucp.CheckpointError`` (or ``except Exception``) never matches. These re-raise
the first rank's error itself (see :func:`torch_ucp.errors.rank_error`), with DCP's exception
chained as its ``__cause__``; every rank raises the same error.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

from torch_ucp.errors import rank_error
from torch_ucp.planner import UCPLoadPlanner, UCPSavePlanner
from torch_ucp.storage import UCPReader, UCPWriter


@contextmanager
def _rank_errors(metadata_error: BaseException | None = None) -> Iterator[None]:
    """Re-raise the first rank's error out of ``CheckpointException``. ``metadata_error``:
    this rank's failure to read the checkpoint's metadata, which ``dcp.load`` reports only
    as text in an ``AssertionError`` ("metadata is None; global metadata read failed: ...")."""
    try:
        yield
    except CheckpointException as e:
        error = rank_error(e)
        if metadata_error is not None and (error is None or isinstance(error, AssertionError)):
            error = metadata_error
        if error is None:
            raise
        raise error from e


def _dcp_options(process_group: dist.ProcessGroup | None) -> dict[str, Any]:
    """``no_dist=True`` for one process without a process group, as DCP would guess (with a
    warning about it, left out here)."""
    return {
        "process_group": process_group,
        "no_dist": process_group is None and not (dist.is_available() and dist.is_initialized()),
    }


@contextmanager
def _quiet_no_dist() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


_DCP_METADATA_FALLBACK = (
    "Global metadata is not found. Falling back to rank local metadata.",
    "Rank local metadata is not found.",
)


def _not_dcp_metadata_fallback(record: logging.LogRecord) -> bool:
    """Drops ``dcp.load``'s warnings (with tracebacks, on the root logger) about falling back
    to rank-local metadata, once torch_ucp knows why the metadata could not be read."""
    return record.msg not in _DCP_METADATA_FALLBACK


@contextmanager
def _metadata_failure_reported(metadata_error: BaseException | None) -> Iterator[None]:
    if metadata_error is None:
        yield
        return
    root = logging.getLogger()
    root.addFilter(_not_dcp_metadata_fallback)
    try:
        yield
    finally:
        root.removeFilter(_not_dcp_metadata_fallback)


def save(
    state_dict: dict[str, Any],
    url: str | os.PathLike,
    *,
    overwrite: bool = False,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> Metadata:
    """Save ``state_dict`` as a torch_ucp checkpoint at ``url``; every rank calls it.

    ``dcp.save(state_dict, storage_writer=UCPWriter(url, overwrite=overwrite, **options),
    planner=planner or UCPSavePlanner(), process_group=process_group)``, raising the first
    rank's error itself, e.g. :class:`~torch_ucp.CheckpointExistsError`. Without a process
    group it saves from this one process.

    Args:
        state_dict: what ``dcp.save`` takes (tensors, DTensors, values, ``Stateful`` objects).
        url: checkpoint folder, a path or fsspec URL (``s3://bucket/run/step-100``).
        overwrite: replace a committed checkpoint at ``url`` (it stays loadable until the new
            one commits).
        planner: the save planner (default :class:`~torch_ucp.UCPSavePlanner`, e.g. with
            ``patterns=``).
        process_group: ranks taking part (default: the whole world).
        **options: :class:`~torch_ucp.UCPWriter` options (``threads``,
            ``checksum_block_bytes``) and fsspec storage options (``endpoint_url``, ``key``...).
    """
    writer = UCPWriter(url, overwrite=overwrite, **options)
    with _rank_errors(), _quiet_no_dist():
        return dcp.save(
            state_dict,
            storage_writer=writer,
            planner=planner if planner is not None else UCPSavePlanner(),
            **_dcp_options(process_group),
        )


def load(
    state_dict: dict[str, Any],
    url: str | os.PathLike,
    *,
    strict: bool = False,
    allow_missing: bool | str | Sequence[str] = False,
    planner: LoadPlanner | None = None,
    verify: bool | str = True,
    verify_load: bool = False,
    process_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> None:
    """Load the checkpoint at ``url`` into ``state_dict`` in place, on any layout; every rank
    calls it.

    ``dcp.load`` with :class:`~torch_ucp.UCPReader` and :class:`~torch_ucp.UCPLoadPlanner`,
    raising the first rank's error itself (:class:`~torch_ucp.CheckpointNotFoundError`,
    :class:`~torch_ucp.LoadPlanError`, :class:`~torch_ucp.CorruptCheckpointError`, ...).
    Keys of the checkpoint absent from ``state_dict`` are ignored; keys of ``state_dict``
    absent from the checkpoint raise :class:`~torch_ucp.LoadPlanError`.

    Args:
        state_dict: the target: tensors and DTensors of any placement, filled in place.
        url: checkpoint folder, a path or fsspec URL.
        strict: also refuse checkpoint keys absent from ``state_dict``.
        allow_missing: keys of ``state_dict`` that may be absent from the checkpoint (they
            keep their values): ``True`` for all, or shell patterns (``"optim.*"``).
        planner: a load planner instead of ``UCPLoadPlanner(strict=..., allow_missing=...)``
            (e.g. with ``patterns=``); then ``strict`` and ``allow_missing`` are its own.
        verify: checksum verification, as :class:`~torch_ucp.UCPReader`'s ``verify``.
        verify_load: after the load, check that every tensor loaded equals what was saved,
            whatever the layouts (:class:`~torch_ucp.ContentMismatchError` names those that
            differ; one all-reduce, plus hashing the loaded bytes once).
        process_group: ranks taking part (default: the whole world).
        **options: :class:`~torch_ucp.UCPReader` options (``threads``, ``share_reads``) and
            fsspec storage options.
    """
    if planner is None:
        planner = UCPLoadPlanner(strict=strict, allow_missing=allow_missing)
    elif strict or allow_missing:
        raise ValueError(
            "torch_ucp.load: give strict= / allow_missing= to the planner you pass, not to load()"
        )
    reader = UCPReader(url, verify=verify, verify_load=verify_load, process_group=process_group, **options)
    try:  # read here (dcp.load then reuses it) to keep the error's type if it fails
        reader.checkpoint_metadata()
        metadata_error = None
    except Exception as e:  # noqa: BLE001 - raised through dcp.load, so every rank raises
        metadata_error = e
    with _rank_errors(metadata_error), _quiet_no_dist(), _metadata_failure_reported(metadata_error):
        dcp.load(state_dict, storage_reader=reader, planner=planner, **_dcp_options(process_group))


__all__ = ["load", "save"]
