"""torch-ucp export URL OUT: consolidated full tensors as Hugging Face safetensors or one
torch.save file, streamed one tensor at a time.

URL is any checkpoint torch-ucp inspect reads: torch_ucp, stock DCP, a DeepSpeed universal
checkpoint folder, or safetensors. Each tensor is read whole (from all its fragments or
chunks), optionally cast, written and released before the next is read, so peak host memory
stays near the largest tensor, not the model.

--format safetensors (default): OUT is a folder (local or any fsspec URL) receiving
  model.safetensors, or with --max-shard-size the Hugging Face sharded layout
  model-00001-of-0000N.safetensors + model.safetensors.index.json (weight_map and
  metadata.total_size); an OUT ending in .safetensors is written as that single file.
  Non-tensor values are skipped (and listed on stderr): safetensors holds tensors only.
--format torch: OUT is a local file (a folder gets model.pt) holding one flat dict
  {key: tensor or value} for torch.load. Non-tensor values are kept. The file is laid out
  first with empty tensor records (torch.save of shape-only tensors), then each tensor's bytes
  are written into its record, one tensor at a time: memory stays bounded here too. (Only if a
  non-tensor value itself holds tensors is the whole state materialised before torch.save.)

Examples:
  torch-ucp export s3://bucket/run/step-100 ./hf --keys 'model.*' --strip-prefix model. \\
      --dtype bfloat16 --max-shard-size 5GB -o endpoint_url=http://127.0.0.1:9000
  torch-ucp export ./ckpt ./consolidated.pt --format torch
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torch_ucp.cli.common import (
    CommandError,
    add_storage_arguments,
    add_trust_argument,
    progress,
    storage_options,
)
from torch_ucp.cli.inspect import plural
from torch_ucp.errors import CheckpointError
from torch_ucp.interop.sources import CheckpointSource, open_source, select_keys
from torch_ucp.sizes import human_bytes
from torch_ucp.storage.store import open_store
from torch_ucp.storage.writer import tensor_bytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TORCH_NAME = "model.pt"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
}


def parse_size(text: str) -> int:
    """``"500MB"`` -> 500_000_000, ``"2GiB"`` -> 2 * 2**30, ``"1024"`` -> 1024 (decimal
    KB/MB/GB as in Hugging Face's ``max_shard_size``; binary KiB/MiB/GiB, K/M/G)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise CommandError(f"cannot parse size {text!r}; use e.g. 500MB, 2GB, 1GiB or bytes")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise CommandError(f"size must be positive, got {text!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="checkpoint: path or fsspec URL (any format inspect reads)")
    parser.add_argument(
        "out",
        metavar="OUT",
        help="safetensors: output folder (or a .safetensors file); torch: output file "
        "(a folder gets model.pt)",
    )
    parser.add_argument(
        "--format",
        choices=("safetensors", "torch"),
        default="safetensors",
        help="output format (default: safetensors)",
    )
    parser.add_argument(
        "--keys",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="export only keys matching any of these shell patterns (give it after URL OUT; matched before "
        "--strip-prefix), e.g. --keys 'model.*'",
    )
    parser.add_argument(
        "--strip-prefix",
        metavar="P",
        help="remove P from the start of every key that has it, e.g. 'model.' for Hugging "
        "Face names; keys without it are kept as they are",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="cast floating-point tensors to this dtype (integer and bool tensors keep theirs)",
    )
    parser.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="safetensors: split into model-0000i-of-0000N.safetensors files of at most SIZE "
        "(e.g. 500MB, 5GB, 1GiB; a larger tensor gets its own file) plus "
        "model.safetensors.index.json",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (stale shards of an earlier export are removed)",
    )
    add_trust_argument(parser)
    add_storage_arguments(parser)


@dataclass(frozen=True)
class ExportItem:
    """One tensor to export: its output name, source key, output dtype and shape."""

    name: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_export(
    source: CheckpointSource,
    patterns: list[str] | None,
    strip_prefix: str | None,
    dtype: torch.dtype | None,
) -> tuple[list[ExportItem], list[tuple[str, str]]]:
    """``(tensors, values)`` to export: ``values`` are ``(output name, source key)``."""
    keys = select_keys(source.keys(), patterns)
    if not keys:
        shown = " ".join(patterns or [])
        raise CommandError(f"no key of {source.url} matches --keys {shown}")
    names: dict[str, str] = {}

    def rename(key: str) -> str:
        name = key
        if strip_prefix and key.startswith(strip_prefix):
            name = key[len(strip_prefix) :]
            if not name:
                raise CommandError(f"--strip-prefix {strip_prefix!r} leaves key {key!r} empty")
        other = names.setdefault(name, key)
        if other != key:
            raise CommandError(f"keys {other!r} and {key!r} both become {name!r}")
        return name

    tensors, values = [], []
    for key in keys:
        if key in source.tensors:
            info = source.tensors[key]
            out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            tensors.append(ExportItem(rename(key), key, out_dtype, info.shape))
        else:
            values.append((rename(key), key))
    return tensors, values


def shard(items: list[ExportItem], max_bytes: int | None) -> list[list[ExportItem]]:
    """Greedy, in key order, as Hugging Face shards: a new file when the next tensor would
    push the current one past ``max_bytes``."""
    if max_bytes is None:
        return [items]
    shards: list[list[ExportItem]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _read(source: CheckpointSource, item: ExportItem) -> torch.Tensor:
    t = source.read_tensor(item.key)
    if t.dtype != item.dtype:
        t = t.to(item.dtype)
    return t


def _split(path: str) -> tuple[str, str]:
    if "://" in path:
        parent, _, name = path.rstrip("/").rpartition("/")
        return parent, name
    return os.path.split(os.path.abspath(path))


def export_safetensors(
    source: CheckpointSource,
    out: str,
    items: list[ExportItem],
    *,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    update: Callable[[int], Any] = lambda n: None,
) -> list[str]:
    """Write ``items`` as safetensors under ``out``; returns the files written (relative)."""
    from torch_ucp.interop.safetensors import SafetensorsFileWriter

    options = dict(storage_options or {})
    if out.endswith(".safetensors"):
        if max_shard_size is not None:
            raise CommandError("--max-shard-size needs an output folder, not a .safetensors file")
        parent, name = _split(out)
        store = open_store(parent, options)
        if store.exists(name) and not overwrite:
            raise CommandError(f"{out} exists; pass --overwrite to replace it")
        plan = [(name, items)]
        index_name = None
    else:
        store = open_store(out, options)
        shards = shard(items, max_shard_size)
        if len(shards) == 1:
            plan = [(SINGLE_NAME, shards[0])]
            index_name = None
        else:
            n = len(shards)
            plan = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]
            index_name = INDEX_NAME
        existing = [
            name
            for name in store.list_dir("")
            if name in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.match(name)
        ]
        if existing and not overwrite:
            raise CommandError(
                f"{out} already holds {', '.join(sorted(existing)[:3])}"
                f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace them"
            )
        for name in existing:
            store.remove(name)
        store.makedirs("")
    written: list[str] = []
    try:
        for name, members in plan:
            layout = [(it.name, it.dtype, it.shape) for it in members]
            with SafetensorsFileWriter(store, name, layout, {"format": "pt"}) as writer:
                for item in members:
                    tensor = _read(source, item)
                    writer.write(item.name, tensor)
                    del tensor
                    update(item.nbytes)
            written.append(name)
        if index_name is not None:
            index = {
                "metadata": {"total_size": sum(it.nbytes for it in items)},
                "weight_map": {it.name: name for name, members in plan for it in members},
            }
            data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            store.write_atomic(index_name, data)
            written.append(index_name)
    except BaseException:
        for name in written:  # a partial export is not left looking complete
            try:
                store.remove(name)
            except Exception:  # noqa: BLE001 - best effort
                pass
        raise
    return written


def _storage_offsets(path: str, names: list[str]) -> dict[str, int] | None:
    """Where each top-level tensor's bytes live in the torch.save zip file ``path``.

    ``torch.load(mmap=True)`` maps the file once and makes every storage a slice of that
    mapping, so a storage's address minus the lowest one equals its record's offset minus the
    lowest record offset. ``None`` if the records are not exactly the tensors of ``names``
    (then a value holds tensors of its own).
    """
    reader = torch._C.PyTorchFileReader(path)
    records = [r for r in reader.get_all_records() if re.fullmatch(r"(.*/)?data/\d+", r)]
    if len(records) != len(names):
        return None
    offsets = sorted(reader.get_record_offset(r) for r in records)
    try:
        loaded = torch.load(path, mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - values this process just saved, re-read once
        loaded = torch.load(path, mmap=True, weights_only=False)
    ptrs = {name: loaded[name].untyped_storage().data_ptr() for name in names}
    del loaded
    if not ptrs:
        return {}
    low = min(ptrs.values())
    result = {name: offsets[0] + p - low for name, p in ptrs.items()}
    if sorted(result.values()) != offsets:
        return None
    return result


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def export_torch(
    source: CheckpointSource,
    out: str,
    items: list[ExportItem],
    values: list[tuple[str, str]],
    *,
    overwrite: bool = False,
    update: Callable[[int], Any] = lambda n: None,
    note: Callable[[str], Any] = lambda s: None,
) -> str:
    """Write one ``torch.save`` file of ``{name: tensor or value}``; returns its path."""
    if "://" in out and not out.startswith("file://"):
        raise CommandError("--format torch writes a local file; OUT must be a local path")
    if os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, TORCH_NAME)
    if os.path.exists(out) and not overwrite:
        raise CommandError(f"{out} exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    value_objects = {name: source.read_value(key) for name, key in values}
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}"
    )
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            skeleton: dict[str, Any] = {it.name: torch.empty(it.shape, dtype=it.dtype) for it in items}
        skeleton.update(value_objects)
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, tmp)
        del skeleton
        offsets = _storage_offsets(tmp, [it.name for it in items])
        if offsets is None:
            note("a non-tensor value holds tensors: holding the whole state in memory for torch.save")
            state: dict[str, Any] = {}
            for it in items:
                state[it.name] = _read(source, it)
                update(it.nbytes)
            state.update(value_objects)
            torch.save(state, tmp)
        else:
            fd = os.open(tmp, os.O_RDWR)
            try:
                for it in items:
                    tensor = _read(source, it)
                    _pwrite_all(fd, tensor_bytes(tensor), offsets[it.name])
                    del tensor
                    update(it.nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    max_shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    if max_shard is not None and args.format != "safetensors":
        raise CommandError("--max-shard-size applies to --format safetensors only")
    source = open_source(args.url, options, trust_pickle=args.trust_pickle)
    items, values = plan_export(
        source, args.keys, args.strip_prefix, DTYPES[args.dtype] if args.dtype else None
    )
    if args.format == "safetensors":
        from torch_ucp.interop.safetensors import safetensors_dtype_name

        for it in items:
            try:
                safetensors_dtype_name(it.dtype)
            except ValueError as e:
                raise CommandError(f"{it.key}: {e}; use --format torch or --keys to leave it out") from None
    total = sum(it.nbytes for it in items)

    def note(text: str) -> None:
        if not args.quiet:
            print(f"torch-ucp export: {text}", file=sys.stderr)

    try:
        with progress(args, total, "export") as update:
            if args.format == "safetensors":
                if values:
                    shown = ", ".join(name for name, _ in values[:10])
                    more = f" and {len(values) - 10} more" if len(values) > 10 else ""
                    note(
                        f"skipped {plural(len(values), 'non-tensor value')} (safetensors holds "
                        f"tensors only): {shown}{more}"
                    )
                files = export_safetensors(
                    source,
                    args.out,
                    items,
                    max_shard_size=max_shard,
                    overwrite=args.overwrite,
                    storage_options=options,
                    update=update,
                )
                shown = files if len(files) <= 4 else [files[0], "...", *files[-2:]]
                where = args.out
                if not args.out.endswith(".safetensors"):
                    where += f" ({plural(len(files), 'file')}: {', '.join(shown)})"
                kept = ""
            else:
                where = export_torch(
                    source, args.out, items, values, overwrite=args.overwrite, update=update, note=note
                )
                kept = f", {plural(len(values), 'value')}"
    except CheckpointError:
        raise
    except OSError as e:
        raise CommandError(" ".join(f"cannot write {args.out}: {e}".split())) from e
    print(
        f"exported {plural(len(items), 'tensor')} ({human_bytes(total)}){kept} from "
        f"{source.format} checkpoint {args.url} to {where}"
    )
    return 0
