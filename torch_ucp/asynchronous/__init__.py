"""Asynchronous save that overlaps checkpoint I/O with training steps.

::

    import torch_ucp

    for step in range(steps):
        train_step()
        if step % 100 == 0:
            torch_ucp.async_save({"model": model_sd, "optim": optim_sd, "step": step},
                                 f"s3://bucket/run/step-{step}", endpoint_url=...)
    torch_ucp.wait()          # the last save committed, or its error re-raised

``async_save`` returns a handle (``handle.result()``: the committed metadata, or the save's
error). The caller is blocked only while ``state_dict()`` is taken and the tensors are copied
into a reusable staging pool (:mod:`~torch_ucp.asynchronous.staging`); planning, checksums and
I/O run in a background thread over a dedicated gloo process group
(:mod:`~torch_ucp.asynchronous.saver`). With ``stage_before_step=optimizer`` the copy runs in
the background too, overlapping forward and backward, and the optimizer's next ``step()``
waits for it. With ``max_staging_bytes`` the pool is bounded and the writer copies what did not
fit (:mod:`~torch_ucp.asynchronous.streaming`).

No save is lost (:mod:`~torch_ucp.asynchronous.inflight`): interpreter exit and
``dist.destroy_process_group()`` wait for the save in flight, and a failure the program never
looked at ends the process with exit status 1. ``dcp.async_save(state,
storage_writer=UCPWriter(url), planner=UCPSavePlanner())`` works too, in thread and process
mode (without these guarantees: its executor is DCP's).

The package is named ``asynchronous`` so that ``torch_ucp.async_save`` stays the function.
"""

from torch_ucp.asynchronous.inflight import wait
from torch_ucp.asynchronous.saver import (
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
from torch_ucp.asynchronous.staging import (
    PreparedState,
    StagedLeaf,
    StagedState,
    StagingPool,
    StagingRaceError,
    rebuild_dtensor,
)
from torch_ucp.asynchronous.streaming import StreamingPlanner

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
    "wait",
]
