"""TorchTitan's ``CheckpointManager``, saving and loading through torch_ucp.

In the ``Trainer.Config`` of a TorchTitan run (its config registry, or wherever the config is
built), use this manager's config instead of ``CheckpointManager.Config``::

    from torch_ucp.integrations.torchtitan import UCPCheckpointManager

    config.checkpoint = UCPCheckpointManager.Config(
        enable=True,
        folder="s3://bucket/run/checkpoint",      # or a local folder (under dump_folder)
        interval=500,
        async_mode="async",                       # or "disabled" / "async_with_pinned_mem"
        storage_options={"endpoint_url": "http://127.0.0.1:9000"},
    )

Everything else stays TorchTitan's: when to save, ``step-N`` folders, finding the latest
step, ``keep_latest_k``, model-only and HF exports. What changes:

* **Save**: ``dcp.save`` with :class:`torch_ucp.UCPWriter` and
  :class:`torch_ucp.UCPSavePlanner`, or in the async modes :func:`torch_ucp.async_save`
  (staging pool, dedicated gloo group, never lost at exit). ``async_with_pinned_mem`` is the
  same save (the pool is pinned when CUDA is available, and TorchTitan's own pinned stager is
  not created); TorchTitan's wait for staging before the optimizer step then waits for
  torch_ucp's staging.
* **Load**: ``dcp.load`` with :class:`torch_ucp.UCPReader` and
  :class:`torch_ucp.UCPLoadPlanner`, so a checkpoint saved on one mesh and world size loads on
  any other.
* **Storage options** reach torch_ucp's writer and reader, and, because TorchTitan's own folder
  helpers (latest step, purging) call fsspec without options, they are also registered as
  fsspec's defaults for the folder's protocol (``fsspec.config.conf``).

HF safetensors saves and loads (``last_save_in_hf``, ``initial_load_in_hf``) stay TorchTitan's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torchtitan.components.checkpointer.base import MODEL, OPTIMIZER
from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager
from torchtitan.tools.utils import GarbageCollection

from torch_ucp.asynchronous import async_save
from torch_ucp.planner import UCPLoadPlanner, UCPSavePlanner
from torch_ucp.storage import UCPReader, UCPWriter
from torch_ucp.storage.urls import is_local_url

# The async mode that cost training the least time per save in benchmarks/async_save_bench.py
# (docs/PERFORMANCE.md): the save call copies into the staging pool.
DEFAULT_STAGE_BEFORE_STEP = False

__all__ = ["UCPCheckpointManager"]


class UCPCheckpointManager(CheckpointManager):
    """TorchTitan's :class:`CheckpointManager` with torch_ucp's writer, reader and planners.

    Built by TorchTitan from :class:`UCPCheckpointManager.Config` like the stock manager.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        storage_options: dict[str, Any] = field(default_factory=dict)
        """fsspec options of the checkpoint folder (``endpoint_url``, ``key``, ``secret``...)."""

        stage_before_step: bool = DEFAULT_STAGE_BEFORE_STEP
        """Async modes: copy the state into the staging pool in the background, overlapping
        forward and backward, and make the optimizers' next step wait for the copy
        (``stage_before_step`` of :func:`torch_ucp.async_save`). Off: the save call copies."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not self.enable:
            return
        self.storage_options = dict(config.storage_options)
        self.stage_before_step = config.stage_before_step
        self._partial_load = False
        if self.async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
            # torch_ucp stages into its own pool; TorchTitan's stager would stage a second copy
            # into pinned shared memory (and refuses to exist without CUDA)
            self.stager = _UnusedStager()
        if not is_local_url(self.folder) and self.storage_options:
            protocol, _ = fsspec.core.split_protocol(self.folder)
            fsspec.config.conf.setdefault(protocol, {}).update(self.storage_options)

    @torch.no_grad()
    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Any:
        """Save with torch_ucp: synchronously, or as :func:`torch_ucp.async_save` returning
        what TorchTitan expects of each async mode (a future, or staging + upload futures)."""
        if to_hf:
            return super().dcp_save(
                state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf
            )
        result: Any = None
        if async_mode == AsyncMode.DISABLED:
            dcp.save(
                state_dict,
                storage_writer=UCPWriter(checkpoint_id, **self.storage_options),
                planner=UCPSavePlanner(),
            )
        else:
            handle = async_save(
                state_dict,
                checkpoint_id,
                stage_before_step=self._optimizers() if self.stage_before_step else None,
                **self.storage_options,
            )
            result = handle.done()
            if async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
                result = AsyncSaveResponse(
                    staging_completion=handle.staged(), upload_completion=handle.done()
                )
        if enable_garbage_collection:
            GarbageCollection.collect("GC collection invoked by checkpointer.")
        return result

    def dcp_load(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        from_hf: bool,
        from_quantized: bool,
    ) -> None:
        """Load with torch_ucp into the current mesh (any layout and world size)."""
        if from_hf:
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        dcp.load(
            state_dict,
            storage_reader=UCPReader(checkpoint_id, **self.storage_options),
            # TorchTitan loads a subset of what it saved (model only at step 0 and from an
            # initial_load_path, exclude_from_loading), which stock DCP allows.
            planner=UCPLoadPlanner(allow_partial_load=self._partial_load),
        )
        if MODEL in self.states:  # TorchTitan flattens the model's entries (as stock)
            self.states[MODEL].load_state_dict(state_dict)

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        self._partial_load = model_only or bool(self.exclude_from_loading)
        return super()._states_to_load(model_only)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers inside TorchTitan's ``OptimizersContainer`` (their
        ``step()`` is what changes the state in place)."""
        container = self.states[OPTIMIZER]
        return list(getattr(container, "optimizers", None) or [container])


class _UnusedStager:
    """Stands in for TorchTitan's ``DefaultStager``, which this manager never uses."""

    def close(self) -> None:
        pass
