"""Plumbing shared by the import readers (DeepSpeed universal, HF safetensors)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.storage import StorageReader


class IndexedReader(StorageReader):
    """A StorageReader that builds an index of the source in ``read_metadata`` and ships it to
    ``read_data`` through ``Metadata.storage_data`` (so a rank that did not read the metadata
    itself still has it). Plans pass through unchanged: every rank reads what it needs."""

    index_type: ClassVar[type] = object
    _index: Any = None

    def _loaded_index(self) -> Any:
        """The index, built by :meth:`read_metadata` on first use (a reader used for
        ``read_data`` alone, or after ``reset``)."""
        if self._index is None:
            self.read_metadata()
        assert self._index is not None
        return self._index

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, self.index_type):
            self._index = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan, **kwargs: Any) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan], **kwargs: Any) -> list[LoadPlan]:
        return plans
