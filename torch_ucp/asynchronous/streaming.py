"""Bounded staging: the writer copies the tensors that did not fit the staging arena.

When a state is larger than ``max_staging_bytes``, :class:`torch_ucp.asynchronous.StagingPool`
stages only part of it and leaves the other tensors *live* in the staged state. The background
save then runs with a :class:`StreamingPlanner` around the real planner: when the writer asks
for the data of a fragment of a live tensor (``resolve_data``), the planner checks that the
tensor was not changed in place since the call, hands the writer a private copy and counts the
fragment as done. Once every live fragment this rank writes has been copied, the save is
*staged* (``handle.staged()`` resolves): the caller of ``async_save`` waits for that (or, with
``stage_before_step``, the optimizer's next step does), so the live tensors cannot change
before they are copied.

The copies live only while the writer writes them (one fragment per writer thread at a time
for :class:`torch_ucp.UCPWriter`), so host memory stays bounded. A fragment the writer asks for
again after the caller was released (a storage retry) cannot be copied any more: the save then
fails with :class:`torch_ucp.CheckpointError` instead of writing bytes from a later step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

from torch_ucp.asynchronous.staging import StagedLeaf, copy_into, unpooled_buffer
from torch_ucp.errors import CheckpointError
from torch_ucp.storage.protocols import ValueSavePlanner

logger = logging.getLogger(__name__)


class StreamingPlanner(SavePlanner):
    """A :class:`SavePlanner` delegating to ``inner`` that copies out live (streamed) tensors.

    Args:
        inner: the real planner (:class:`torch_ucp.UCPSavePlanner` by default). It must keep
            the (flattened) state dict it plans as ``inner.state_dict``, as DCP's
            ``DefaultSavePlanner`` and its subclasses do; otherwise the caller stays blocked
            until the whole save is written.
        streamed: the live tensors/DTensors in the staged state, by ``id()``
            (:attr:`StagedState.streamed`); each is checked for in-place changes since the
            call before it is copied.
    """

    def __init__(
        self,
        inner: SavePlanner,
        streamed: Mapping[int, StagedLeaf],
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._streamed = streamed
        self._on_release = on_release
        self._pending: set[MetadataIndex] = set()
        self._lock = threading.Lock()
        self.released = threading.Event()  # all copied, or the save failed
        self.all_copied = False  # every streamed fragment of this rank was copied
        self.copied_bytes = 0

    @classmethod
    def around(
        cls,
        inner: SavePlanner,
        streamed: Mapping[int, StagedLeaf],
        on_release: Callable[[], None] | None = None,
    ) -> StreamingPlanner:
        """A streaming planner around ``inner`` that also hands over raw values (the
        :class:`~torch_ucp.storage.protocols.ValueSavePlanner` protocol) when ``inner`` does."""
        kind = _StreamingValuePlanner if isinstance(inner, ValueSavePlanner) else cls
        return kind(inner, streamed, on_release)

    @property
    def inner(self) -> SavePlanner:
        return self._inner

    # -- SavePlanner protocol -----------------------------------------------------------------
    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self._inner.set_up_planner(state_dict=state_dict, storage_meta=storage_meta, is_coordinator=is_coordinator)

    def create_local_plan(self) -> SavePlan:
        return self._inner.create_local_plan()

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return self._inner.create_global_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = self._inner.finish_plan(new_plan)
        state = getattr(self._inner, "state_dict", None)
        if not isinstance(state, dict):
            logger.warning(
                "torch_ucp: %s keeps no state_dict; bounded staging cannot tell streamed "
                "tensors apart, the caller stays blocked until the save is written",
                type(self._inner).__name__,
            )
            return plan
        with self._lock:
            self._pending = {
                item.index
                for item in plan.items
                if item.type != WriteItemType.BYTE_IO and self._streamed_leaf(item) is not None
            }
            if not self._pending:
                self._release()
        return plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | Any:
        data = self._inner.resolve_data(write_item)
        leaf = None if write_item.type == WriteItemType.BYTE_IO else self._streamed_leaf(write_item)
        if leaf is None:
            return data
        if self.released.is_set():
            raise CheckpointError(
                f"{write_item.index.fqn}: the writer asked again for a fragment of a tensor that "
                "was not staged (bounded staging, max_staging_bytes) after training resumed; "
                "its bytes may have changed, so this save is abandoned"
            )
        leaf.check_unmodified()
        if leaf.event is not None:  # pragma: no cover - CUDA: work queued before the call
            leaf.event.synchronize()
        with torch.no_grad():
            out = unpooled_buffer(data.shape, data.dtype)
            copy_into(out, data)
        leaf.check_unmodified()
        with self._lock:
            self.copied_bytes += out.numel() * out.element_size()
            self._pending.discard(write_item.index)
            if not self._pending:
                self._release()
        return out

    def _release(self) -> None:
        if not self.all_copied:
            self.all_copied = True
            self.released.set()
            if self._on_release is not None:
                self._on_release()

    def _streamed_leaf(self, item: WriteItem) -> StagedLeaf | None:
        state = getattr(self._inner, "state_dict", None)
        obj = state.get(item.index.fqn) if isinstance(state, dict) else None
        return None if obj is None else self._streamed.get(id(obj))


class _StreamingValuePlanner(StreamingPlanner):
    """:class:`StreamingPlanner` around a planner that hands over raw values: values are never
    streamed (they are staged with the state), so they pass straight through."""

    def resolve_value(self, write_item: WriteItem) -> Any:
        return self._inner.resolve_value(write_item)  # type: ignore[attr-defined]
