"""Asynchronous save that overlaps checkpoint I/O with training steps.

::

    from torch_ucp.async_save import async_save

    handle = async_save({"model": model_sd, "optim": optim_sd, "step": step},
                        "s3://bucket/run/step-100", endpoint_url=...)
    ...                       # training continues while the checkpoint is written
    handle.result()           # committed metadata, or the save's error re-raised

The caller is blocked only while ``state_dict()`` is taken and the tensors are copied into a
reusable staging pool (:mod:`~torch_ucp.async_save.staging`); planning, checksums and I/O run in
a background thread over a dedicated gloo process group (:mod:`~torch_ucp.async_save.saver`).
With ``stage_before_step=optimizer`` the copy runs in the background too, overlapping forward
and backward, and the optimizer's next ``step()`` waits for it.
With ``max_staging_bytes`` the pool is bounded and the writer copies what did not fit
(:mod:`~torch_ucp.async_save.streaming`). ``dcp.async_save(state,
storage_writer=UCPWriter(url), planner=UCPSavePlanner())`` works too, in thread and process mode.
"""

from torch_ucp.async_save.saver import (
    MAX_STAGING_BYTES_ENV,
    AsyncSaveHandle,
    AsyncSaver,
    AsyncSaveStats,
    async_save,
    checkpoint_process_group,
    close,
    default_max_staging_bytes,
    default_saver,
)
from torch_ucp.async_save.staging import (
    PreparedState,
    StagedLeaf,
    StagedState,
    StagingPool,
    StagingRaceError,
    rebuild_dtensor,
)
from torch_ucp.async_save.streaming import StreamingPlanner

__all__ = [
    "MAX_STAGING_BYTES_ENV",
    "AsyncSaveHandle",
    "AsyncSaveStats",
    "AsyncSaver",
    "PreparedState",
    "StagedLeaf",
    "StagedState",
    "StagingPool",
    "StagingRaceError",
    "StreamingPlanner",
    "async_save",
    "checkpoint_process_group",
    "close",
    "default_max_staging_bytes",
    "default_saver",
    "rebuild_dtensor",
]
