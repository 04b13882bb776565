"""``dcp.save`` / ``dcp.load`` in one plain process through torch_ucp, as most tests need them."""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader

from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter


def save_plain(url: str, state: dict[str, Any], *, planner: SavePlanner | None = None,
               **writer_kwargs: Any) -> UCPWriter:
    """Save ``state`` to ``url`` with ``UCPWriter(url, **writer_kwargs)``; returns the writer.
    DCP's warning that no process group is in use is silenced: it is the point here."""
    writer = UCPWriter(url, **writer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=writer, planner=planner or UCPSavePlanner(), no_dist=True)
    return writer


def load_plain(url: str, state: dict[str, Any], *, reader: StorageReader | None = None,
               planner: LoadPlanner | None = None, **reader_kwargs: Any) -> dict[str, Any]:
    """Load ``url`` into ``state`` in place (``UCPReader(url, **reader_kwargs)`` unless
    ``reader`` is given, ``UCPLoadPlanner()`` unless ``planner`` is); returns ``state``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(
            state,
            storage_reader=reader or UCPReader(url, **reader_kwargs),
            planner=planner or UCPLoadPlanner(),
            no_dist=True,
        )
    return state
