"""``verify_load``: prove that what a load delivered equals what was saved, in any layout.

Each rank adds up the content hash (:mod:`torch_ucp.metadata.content_hash`) of every box it
loaded into its target, per tensor and in the checkpoint's global coordinates; one all-reduce
over the load's process group gives every rank the sums of the whole job, compared with the
hashes the save recorded in the header.

Replicas are counted, not deduplicated: a tensor that ``k`` ranks each hold whole (or ``k``
replica groups of shards) sums to ``k * H`` with ``k * numel`` elements, so every replica's
copy is checked. A tensor loaded unevenly (some elements more often than others; only custom
planners do that) or into another dtype is reported as not checked.

The all-reduce is a collective: every rank reaches it even when its own reads failed (it then
contributes a failure flag, the other ranks skip the comparison, and DCP reports the failing
rank's error everywhere). The coordinator checks in ``prepare_global_plan`` that every rank
asked for ``verify_load`` and that the reader's process group is the one ``dcp.load`` runs on,
so a mismatch is one clear error on every rank, never a hang.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from torch_ucp.errors import CheckpointError, ContentMismatchError
from torch_ucp.metadata import content_hash
from torch_ucp.metadata.catalog import FragmentCatalog

logger = logging.getLogger(__name__)

_LOW = (1 << 32) - 1


@dataclass(frozen=True)
class VerifyRequest:
    """One rank's ``LoadPlan.storage_data`` for the coordinator: whether it verifies, and the
    size of the process group it would all-reduce on."""

    verify_load: bool
    group_size: int


@dataclass(frozen=True)
class VerifyPlan:
    """The coordinator's answer (``LoadPlan.storage_data``), the same for every rank.

    Attributes:
        verify_load: every rank checks.
        collective: the sums are all-reduced (more than one rank loads).
        problem: why the check cannot run; every rank raises it before reading.
    """

    verify_load: bool
    collective: bool
    problem: str | None = None


def plan_verification(requests: Sequence[object]) -> VerifyPlan:
    """The coordinator's step: one :class:`VerifyPlan` from every rank's :class:`VerifyRequest`
    (anything else: a reader that did not prepare its plan, taken as not verifying)."""
    asked = [isinstance(r, VerifyRequest) and r.verify_load for r in requests]
    if not any(asked):
        return VerifyPlan(verify_load=False, collective=False)
    n = len(requests)
    if not all(asked):
        return VerifyPlan(True, n > 1, "verify_load must be given to the UCPReader of every rank (some ranks did not)")
    sizes = sorted({r.group_size for r in requests if isinstance(r, VerifyRequest)})
    if n > 1 and sizes != [n]:
        return VerifyPlan(
            True, True,
            f"verify_load: UCPReader's process group has {sizes} rank(s) but dcp.load runs on {n}: "
            "pass the process group dcp.load uses as UCPReader(process_group=...)",
        )
    return VerifyPlan(verify_load=True, collective=n > 1)


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class LoadedContent:
    """The partial content hashes of what one rank loaded, per tensor of the checkpoint.

    :meth:`add` is called from the reader's threads as each box lands in its target."""

    def __init__(self, catalog: FragmentCatalog) -> None:
        self.catalog = catalog
        n = len(catalog.entries)
        self._hashes = [0] * n
        self._counts = [0] * n
        self._other_dtype: set[int] = set()
        self._lock = threading.Lock()

    def add(self, fqn: str, offsets: Sequence[int], loaded: torch.Tensor) -> None:
        """Count ``loaded``, the box at global ``offsets`` of tensor ``fqn`` as delivered."""
        t = self.catalog.position[fqn]
        entry = self.catalog.entries[t]
        if loaded.dtype != entry.dtype:
            with self._lock:
                self._other_dtype.add(t)
            return
        h = content_hash.tensor_hash(loaded, offsets, entry.shape)
        with self._lock:
            self._hashes[t] = (self._hashes[t] + h) & content_hash.MASK
            self._counts[t] += loaded.numel()

    def check(self, plan: VerifyPlan, group: dist.ProcessGroup | None, *, failed: bool, url: str) -> None:
        """Combine every rank's sums (a collective when ``plan.collective``) and raise
        :class:`~torch_ucp.errors.ContentMismatchError` naming each tensor whose loaded
        content differs from the saved one. ``failed``: this rank's reads failed (it still
        takes part; nothing is compared)."""
        entries = self.catalog.entries
        n = len(entries)
        sums = np.zeros((n + 1, 4), dtype=np.int64)  # hash low 32 bits, high 32 bits, elements, other dtype
        hashes = np.array(self._hashes, dtype=np.uint64)
        sums[:n, 0] = (hashes & np.uint64(_LOW)).astype(np.int64)
        sums[:n, 1] = (hashes >> np.uint64(32)).astype(np.int64)
        sums[:n, 2] = self._counts
        sums[list(self._other_dtype), 3] = 1
        sums[n, 0] = int(failed)
        if plan.collective:
            total = torch.from_numpy(sums)
            if "nccl" in str(dist.get_backend(group)).lower():
                total = total.cuda()
            dist.all_reduce(total, group=group)
            sums = total.cpu().numpy()
        if sums[n, 0]:
            return  # a rank's reads failed: DCP reports that rank's error on every rank
        wrong, unchecked, absent = [], [], []
        for t, entry in enumerate(entries):
            count = int(sums[t, 2])
            if sums[t, 3]:
                unchecked.append(f"{entry.fqn} (loaded into another dtype)")
                continue
            if count == 0:
                continue  # not loaded
            if entry.content_hash is None:
                absent.append(entry.fqn)
                continue
            copies, rest = divmod(count, entry.numel)
            if rest:
                unchecked.append(f"{entry.fqn} (some elements loaded more often than others)")
                continue
            got = (int(sums[t, 0]) + (int(sums[t, 1]) << 32)) & content_hash.MASK
            expected = (copies * entry.content_hash) & content_hash.MASK
            if got != expected:
                wrong.append((entry.fqn, copies))
        if absent:
            logger.warning(
                "torch_ucp verify_load: %s records no content hash for %d tensor(s) (saved without "
                "content_hash), not checked: %s", url, len(absent), ", ".join(absent[:20]),
            )
        if unchecked:
            logger.warning("torch_ucp verify_load: not checked: %s", "; ".join(unchecked[:20]))
        if wrong:
            shown = ", ".join(repr(f) for f, _ in wrong[:10]) + (" ..." if len(wrong) > 10 else "")
            raise ContentMismatchError(
                f"verify_load: the content loaded from {url} differs from what was saved for "
                f"{len(wrong)} tensor(s): {shown} (the sum of the loaded shards' content hashes "
                "does not match the hash the save recorded)",
                tensors=[f for f, _ in wrong],
            )


def check_plan(plan: object) -> VerifyPlan | None:
    """This rank's :class:`VerifyPlan` from ``LoadPlan.storage_data`` (``None``: not verifying);
    raises the coordinator's problem, on every rank alike."""
    if not isinstance(plan, VerifyPlan) or not plan.verify_load:
        return None
    if plan.problem is not None:
        raise CheckpointError(plan.problem)
    return plan


__all__ = ["LoadedContent", "VerifyPlan", "VerifyRequest", "check_plan", "group_size", "plan_verification"]
