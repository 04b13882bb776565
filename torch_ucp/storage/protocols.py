"""What torch_ucp's storage layer asks of a planner beyond DCP's ``SavePlanner``/``LoadPlanner``.

DCP hands non-tensor values (``BYTE_IO`` items) between planner and storage as ``torch.save``
bytes, which only pickle can read back. A planner that also implements one of these protocols
hands over (or accepts) the value itself, so the storage layer encodes it without pickle
(:mod:`torch_ucp.metadata.values`). :class:`~torch_ucp.UCPSavePlanner` and
:class:`~torch_ucp.UCPLoadPlanner` implement them; a stock planner gets the ``torch.save``
path, re-encoded without pickle where the value allows.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch.distributed.checkpoint.planner import ReadItem, WriteItem

__all__ = ["ValueLoadPlanner", "ValueSavePlanner"]


@runtime_checkable
class ValueSavePlanner(Protocol):
    """A save planner that hands the writer a ``BYTE_IO`` item's value itself."""

    def resolve_value(self, write_item: WriteItem) -> Any:
        """The raw (not ``torch.save``-encoded) value of the ``BYTE_IO`` item ``write_item``."""
        ...


@runtime_checkable
class ValueLoadPlanner(Protocol):
    """A load planner that accepts a decoded non-tensor value from the reader."""

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Place ``value``, decoded without pickle, where ``read_item`` points."""
        ...
