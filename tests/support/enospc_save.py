"""A save that runs out of disk space, then its retry, on a real, small filesystem.

Run inside a private mount namespace with a tmpfs of ``--size-mib`` MiB mounted at ``DIR``
(``unshare --user --map-root-user --mount``, see tests/test_commit.py); prints one JSON object.

1. save A (4 MiB), then fill the disk until 6 MiB are free;
2. save B (8 MiB) over it: fails with ENOSPC; A still loads, and B's partial data is gone (the
   free space is back to 6 MiB);
3. free 4 MiB more: 10 MiB free, enough for B but not if the failed B's partial data (up to
   6 MiB) were still there; the retry of B succeeds and loads bit-exact.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from torch_ucp import UCPSavePlanner, UCPWriter, open_checkpoint

MiB = 1 << 20


def _state(seed: int, mib: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(MiB // 4096, 1024, generator=g) for i in range(mib)}


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: str, leave: int) -> None:
    with open(path + "/filler", "ab") as f:
        chunk = b"\0" * (64 << 10)
        while _free(path) > leave:
            f.write(chunk[: max(4096, min(len(chunk), _free(path) - leave))])
            f.flush()
            os.fsync(f.fileno())


def _save(url: str, state: dict) -> BaseException | None:
    try:
        dcp.save(state, storage_writer=UCPWriter(url, overwrite=True, threads=2),
                 planner=UCPSavePlanner(), no_dist=True)
    except CheckpointException as e:
        return next(iter(e.failures.values()))[0]
    return None


def _errnos(exc: BaseException | None) -> list[int]:
    out = []
    while exc is not None and len(out) < 10:
        out.append(getattr(exc, "errno", None))
        exc = exc.__cause__ or exc.__context__
    return out


def _loads(url: str, state: dict) -> bool:
    ckpt = open_checkpoint(url)
    return all(torch.equal(ckpt.read(k), v) for k, v in state.items())


def main() -> None:
    root = sys.argv[1]
    warnings.simplefilter("ignore")
    url = os.path.join(root, "ckpt")
    a, b = _state(1, 4), _state(2, 8)
    out: dict = {"first_save": repr(_save(url, a))}
    _fill(root, 6 * MiB)
    out["free_before"] = _free(root)
    failure = _save(url, b)
    out["failure"] = repr(failure)
    out["enospc"] = errno.ENOSPC in _errnos(failure)
    out["free_after_failure"] = _free(root)
    out["a_loads_after_failure"] = _loads(url, a)
    out["entries_after_failure"] = sorted(os.listdir(url))
    with open(root + "/filler", "r+b") as f:  # space is back: 4 MiB more
        f.truncate(max(0, os.fstat(f.fileno()).st_size - 4 * MiB))
    out["free_for_retry"] = _free(root)
    out["retry"] = repr(_save(url, b))
    out["b_loads_after_retry"] = _loads(url, b)
    out["entries_after_retry"] = sorted(os.listdir(url))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
