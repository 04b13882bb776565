"""Check a committed checkpoint end to end: metadata, coverage, object sizes, every checksum."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torch_ucp.errors import CheckpointError
from torch_ucp.metadata.schema import CheckpointMetadata
from torch_ucp.storage.reader import load_metadata, read_value_bytes
from torch_ucp.storage.reading import BoxRead, FragmentReader
from torch_ucp.storage.store import Store
from torch_ucp.storage.values import TORCH_SAVE, decode_value

_BATCH_BYTES = 256 << 20  # bound on host memory while verifying


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` checked and the problems it found."""

    url: str
    tensors: int = 0
    fragments: int = 0
    values: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _coverage_problems(meta: CheckpointMetadata) -> list[str]:
    problems = []
    for fqn, t in meta.tensors.items():
        covered = sum(f.numel for f in t.fragments)
        total = math.prod(t.shape)
        if covered != total and total != 0:
            problems.append(
                f"{fqn}: fragments cover {covered} of {total} elements of shape {list(t.shape)}"
            )
    return problems


def verify_checkpoint(
    url: str,
    *,
    progress: Callable[[int], Any] | None = None,
    **storage_options: Any,
) -> VerifyReport:
    """Read every fragment and value of the checkpoint at ``url`` and verify its checksums.

    Never raises for a damaged checkpoint: problems are collected in the report (metadata that
    cannot be read at all is one problem). ``progress`` is called with bytes checked.
    """
    store = Store(url, storage_options)
    report = VerifyReport(url)
    try:
        meta = load_metadata(store)
    except (CheckpointError, OSError) as e:
        report.problems.append(str(e))
        return report
    report.problems.extend(_coverage_problems(meta))
    sizes: dict[str, int] = {}
    for name in sorted(meta.data_objects()):
        try:
            sizes[name] = int(store.fs.size(store.path(name)))
        except FileNotFoundError:
            report.problems.append(f"data object {store.describe(name)} is missing")
    for t in meta.tensors.values():
        for f in t.fragments:
            end = f.data.byte_offset + f.data.byte_length
            if f.data.object in sizes and end > sizes[f.data.object]:
                report.problems.append(
                    f"{t.fqn}: fragment at {list(f.offsets)} needs bytes up to {end} of "
                    f"{store.describe(f.data.object)}, which has {sizes[f.data.object]}"
                )
    reader = FragmentReader(
        store,
        verify=True,
        checksum_algorithm=meta.checksum_algorithm,
        block_bytes=meta.checksum_block_bytes,
        block_width=meta.checksum_block_width,
    )
    batch: list[BoxRead] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        try:
            stats = reader.read(batch)
            report.bytes_checked += stats.bytes_read
            if progress is not None:
                progress(stats.bytes_read)
        except (CheckpointError, OSError):
            for r in batch:  # find every bad fragment, not just the first
                try:
                    reader.read([r])
                except (CheckpointError, OSError) as e:
                    report.problems.append(str(e))
        batch, batch_bytes = [], 0

    for t in meta.tensors.values():
        report.tensors += 1
        for f in t.fragments:
            report.fragments += 1
            if f.data.object not in sizes:
                continue
            batch.append(
                BoxRead(
                    name=t.fqn,
                    data=f.data,
                    dtype=t.dtype,
                    fragment_offsets=f.offsets,
                    fragment_shape=f.lengths,
                    offsets=(0,) * len(f.lengths),
                    lengths=f.lengths,
                    dest=torch.empty(f.lengths, dtype=t.dtype),
                )
            )
            batch_bytes += f.data.byte_length
            if batch_bytes >= _BATCH_BYTES:
                flush()
    if batch:
        flush()
    for entry in meta.objects.values():
        report.values += 1
        if entry.data.object not in sizes:
            continue
        try:
            data = read_value_bytes(store, entry, meta, verify=True)
            if entry.encoding != TORCH_SAVE:  # well-formed too; a pickle is never run here
                decode_value(entry.encoding, data, entry.fqn)
            report.bytes_checked += entry.data.byte_length
        except Exception as e:  # noqa: BLE001 - decoding errors are problems too
            report.problems.append(f"value {entry.fqn!r}: {e}")
    return report
