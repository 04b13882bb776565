"""One INFO line per save and per load: bytes, seconds, GB/s and the save id.

A save is logged once, by the coordinator when it commits, with the bytes of every rank; a
load by every rank, with the bytes that rank read (ranks read different parts). Enable with
``logging.getLogger("torch_ucp").setLevel(logging.INFO)`` (and a handler, e.g.
``logging.basicConfig()``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from torch_ucp.sizes import human_bytes, rate

logger = logging.getLogger("torch_ucp.storage")


def log_save(url: str, save_id: str, results: Sequence[Sequence[Any]], started: float | None) -> None:
    """After the commit of ``url``: ``results`` are every rank's DCP ``WriteResult`` lists,
    ``started`` the ``time.monotonic()`` at which this save began."""
    if not logger.isEnabledFor(logging.INFO):
        return
    nbytes = sum(r.size_in_bytes for rank in results for r in rank)
    seconds = time.monotonic() - started if started is not None else 0.0
    logger.info(
        "torch_ucp: saved %s to %s in %.2f s (%s) from %d rank%s, save id %s",
        human_bytes(nbytes), url, seconds, rate(nbytes, seconds), len(results),
        "" if len(results) == 1 else "s", save_id,
    )


def log_load(url: str, save_id: str, nbytes: int, started: float | None) -> None:
    """After this rank read ``nbytes`` of ``url`` for a load begun at ``started``."""
    if not logger.isEnabledFor(logging.INFO):
        return
    seconds = time.monotonic() - started if started is not None else 0.0
    rank = f"rank {dist.get_rank()} " if dist.is_available() and dist.is_initialized() else ""
    logger.info(
        "torch_ucp: %sloaded %s from %s in %.2f s (%s), save id %s",
        rank, human_bytes(nbytes), url, seconds, rate(nbytes, seconds), save_id,
    )
