"""Check a committed checkpoint end to end: header and index checksums, exact tiling of every
tensor, fragment counts, object sizes, every data checksum, every value, and (``logical``)
every tensor's content hash."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torch_ucp.errors import CheckpointError
from torch_ucp.metadata import content_hash
from torch_ucp.metadata.catalog import FragmentCatalog
from torch_ucp.metadata.tiling import tiling_problem
from torch_ucp.metadata.values import TORCH_SAVE, decode_value
from torch_ucp.storage.fragment_reader import BoxRead, FragmentReader
from torch_ucp.storage.reader import open_catalog, read_value_bytes
from torch_ucp.storage.store import open_store

_BATCH_BYTES = 256 << 20  # bound on host memory while verifying


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` checked and the problems it found."""

    url: str
    tensors: int = 0
    fragments: int = 0
    values: int = 0
    bytes_checked: int = 0
    logical_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _layout_problems(catalog: FragmentCatalog) -> list[str]:
    """Every tensor tiled exactly by its fragments, with as many fragments as the header says."""
    problems = []
    rows = catalog.rows
    for fqn, t in catalog.meta.tensors.items():
        mine = catalog.rows_of(fqn)
        if len(mine) != t.fragments:
            problems.append(f"{fqn!r}: {len(mine)} fragments in the indexes, the header says {t.fragments}")
        ndim = len(t.shape)
        lo = rows.offsets[mine, :ndim]
        problem = tiling_problem(lo, lo + rows.lengths[mine, :ndim], (0,) * ndim, t.shape)
        if problem is not None:
            problems.append(f"{fqn!r}: fragments do not tile shape {list(t.shape)}: {problem}")
    return problems


def verify_checkpoint(
    url: str,
    *,
    progress: Callable[[int], Any] | None = None,
    logical: bool = False,
    **storage_options: Any,
) -> VerifyReport:
    """Read every fragment and value of the checkpoint at ``url`` and verify its checksums.

    ``logical``: also recompute every tensor's content hash from its fragments and compare it
    with the one the save recorded (:mod:`torch_ucp.metadata.content_hash`); this catches
    fragments whose bytes are intact but placed wrongly. A checkpoint that records no content
    hash is then a problem.

    Never raises for a damaged checkpoint: problems are collected in the report (metadata that
    cannot be read at all is one problem). ``progress`` is called with bytes checked.
    """
    store = open_store(url, storage_options)
    report = VerifyReport(url)
    try:
        catalog = open_catalog(store)
        catalog.require_all()
    except (CheckpointError, OSError) as e:
        report.problems.append(str(e))
        return report
    meta = catalog.meta
    report.problems.extend(_layout_problems(catalog))
    rows = catalog.rows
    names = sorted({rows.objects[i] for i in np.unique(rows.object).tolist()} | {v.data.object for v in meta.values.values()})
    sizes: dict[str, int] = {}
    for name in names:
        try:
            sizes[name] = store.size(name)
        except FileNotFoundError:
            report.problems.append(f"data object {store.describe(name)} is missing")
    ends = rows.byte_offset + rows.byte_length
    for i in range(len(rows)):
        name = rows.objects[int(rows.object[i])]
        if name in sizes and int(ends[i]) > sizes[name]:
            f = catalog.fragment(i)
            report.problems.append(
                f"{catalog.names[int(rows.tensor[i])]}: fragment at {list(f.offsets)} needs bytes up to "
                f"{int(ends[i])} of {store.describe(name)}, which has {sizes[name]}"
            )
    reader = FragmentReader.for_checkpoint(store, meta)
    fragment_hashes: dict[int, int] = {}  # row -> its hash (a re-read after an error overwrites)

    def hashed(row: int, offsets: tuple[int, ...], shape: tuple[int, ...]) -> Callable[[torch.Tensor], None]:
        def done(t: torch.Tensor) -> None:
            fragment_hashes[row] = content_hash.tensor_hash(t, offsets, shape)

        return done

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

    report.tensors = len(meta.tensors)
    for i in range(len(rows)):
        report.fragments += 1
        f = catalog.fragment(i)
        if f.data.object not in sizes:
            continue
        t = catalog.entries[int(rows.tensor[i])]
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
                on_done=hashed(i, f.offsets, t.shape) if logical else None,
            )
        )
        batch_bytes += f.data.byte_length
        if batch_bytes >= _BATCH_BYTES:
            flush()
    if batch:
        flush()
    if logical:
        _check_content(catalog, fragment_hashes, report)
    for entry in meta.values.values():
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


def _check_content(catalog: FragmentCatalog, fragment_hashes: dict[int, int], report: VerifyReport) -> None:
    """Every tensor whose fragments were all read: the sum of their content hashes against the
    header's (tensors with a fragment that could not be read are reported already)."""
    if not any(e.content_hash is not None for e in catalog.entries) and catalog.entries:
        report.problems.append("--logical: the checkpoint records no content hashes (saved without content_hash)")
        return
    tensor = np.asarray(catalog.rows.tensor, dtype=np.int64)
    read = np.zeros(len(tensor), dtype=bool)
    hashes = np.zeros(len(tensor), dtype=np.uint64)
    rows = np.fromiter(fragment_hashes, dtype=np.int64, count=len(fragment_hashes))
    hashes[rows] = np.fromiter(fragment_hashes.values(), dtype=np.uint64, count=len(fragment_hashes))
    read[rows] = True
    sums = np.zeros(len(catalog.entries), dtype=np.uint64)
    np.add.at(sums, tensor, hashes)  # uint64 addition wraps: the sum modulo 2^64
    complete = np.ones(len(catalog.entries), dtype=bool)
    complete[tensor[~read]] = False
    for t, entry in enumerate(catalog.entries):
        if not complete[t] or entry.content_hash is None:
            continue
        report.logical_checked += 1
        if int(sums[t]) != entry.content_hash:
            report.problems.append(
                f"{entry.fqn!r}: content hash of its fragments is {content_hash.to_hex(int(sums[t]))}, the save "
                f"recorded {content_hash.to_hex(entry.content_hash)} (intact bytes in the wrong place, or "
                "changed bytes whose checksums were rewritten)"
            )
