"""torch-ucp convert SRC DST: write any checkpoint torch_ucp reads as a torch_ucp checkpoint.

SRC may be a stock DCP checkpoint (pickled .metadata), a DeepSpeed universal checkpoint
(the ds_to_universal output folder with zero/, or the folder holding
latest_universal), Hugging Face safetensors weights, or a torch_ucp checkpoint (rewritten
with one fragment per tensor). DST receives a torch_ucp checkpoint: JSON metadata, raw bytes,
block checksums, .metadata committed last and atomically, so a failed conversion leaves no
checkpoint at DST (and an earlier one there, with --overwrite, stays loadable until the commit).

Tensors are read whole one at a time and written as they come (CheckpointBuilder), so peak
host memory stays near the largest tensor. Keys, the nested-state-dict paths and, where SRC
records them, the mesh and placements each tensor was saved from are kept. Then load DST on any
layout with UCPReader + UCPLoadPlanner, or check it with torch-ucp verify DST.

The same --storage-option values apply to SRC and DST.

Examples:
  torch-ucp convert ./dcp-step-100 s3://bucket/run/step-100 -o endpoint_url=http://127.0.0.1:9000
  torch-ucp convert ./ds_ckpt/global_step10_universal ./ucp-step-10
"""

from __future__ import annotations

import argparse
import os

from torch_ucp.cli.common import (
    CommandError,
    add_storage_arguments,
    add_trust_argument,
    progress,
    storage_options,
)
from torch_ucp.cli.inspect import plural
from torch_ucp.errors import CheckpointError, CheckpointExistsError
from torch_ucp.interop.sources import open_source, select_keys
from torch_ucp.sizes import human_bytes
from torch_ucp.storage.builder import CheckpointBuilder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint to convert: path or fsspec URL")
    parser.add_argument("dst", metavar="DST", help="torch_ucp checkpoint to write: path or fsspec URL")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a committed checkpoint at DST (it stays loadable until the new one commits)",
    )
    parser.add_argument(
        "--keys",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="convert only keys matching any of these shell patterns (give it after SRC DST)",
    )
    add_trust_argument(parser)
    add_storage_arguments(parser)


def _same(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    if _same(args.src, args.dst):
        raise CommandError("SRC and DST are the same; convert into a new folder")
    source = open_source(args.src, options, trust_pickle=args.trust_pickle)
    keys = select_keys(source.keys(), args.keys)
    if not keys:
        raise CommandError(f"no key of {args.src} matches --keys {' '.join(args.keys or [])}")
    tensors = [k for k in keys if k in source.tensors]
    values = [k for k in keys if k in source.values]
    total = sum(source.tensors[k].nbytes for k in tensors)
    try:
        try:
            # values unpickled with --trust-pickle that have no pickle-free encoding stay pickled
            builder = CheckpointBuilder(
                args.dst, overwrite=args.overwrite, allow_pickle=args.trust_pickle, **options
            )
        except CheckpointExistsError:
            raise CheckpointExistsError(
                f"{args.dst} already holds a committed checkpoint; pass --overwrite to replace it"
            ) from None
        with builder, progress(args, total, "convert") as update:
            for key in tensors:
                info = source.tensors[key]
                tensor = source.read_tensor(key)
                builder.add_tensor(
                    key, tensor, path=info.path, mesh=info.mesh, placements=info.placements
                )
                del tensor
                update(info.nbytes)
            for key in values:
                builder.add_value(key, source.read_value(key), path=source.values[key].path)
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(" ".join(f"cannot convert to {args.dst}: {e}".split())) from e
    print(
        f"converted {source.format} checkpoint {args.src} -> torch_ucp checkpoint {args.dst}: "
        f"{plural(len(tensors), 'tensor')} ({human_bytes(total)}), "
        f"{plural(len(values), 'value')}, "
        f"save id {builder.save_id}"
    )
    return 0
