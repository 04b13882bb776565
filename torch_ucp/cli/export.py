"""torch-ucp export URL OUT: consolidated full tensors as Hugging Face safetensors or one
torch.save file, streamed one tensor at a time (torch_ucp.tools.export_safetensors /
export_torch, whose command line this is).

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
import sys

import torch

from torch_ucp.cli.common import (
    CommandError,
    add_keys_argument,
    add_storage_arguments,
    add_trust_argument,
    options_as_flags,
    plural,
    progress,
    storage_options,
)
from torch_ucp.errors import CheckpointError
from torch_ucp.sizes import human_bytes, parse_size
from torch_ucp.tools import export_safetensors, export_torch, plan_export

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_FLAGS = {
    "out": "OUT",
    "keys": "--keys",
    "strip_prefix": "--strip-prefix",
    "dtype": "--dtype",
    "max_shard_size": "--max-shard-size",
    "overwrite": "--overwrite",
}


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
    add_keys_argument(
        parser,
        "export only keys matching any of these shell patterns (give it after URL OUT; matched before "
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


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    if args.max_shard_size is not None:
        if args.format != "safetensors":
            raise CommandError("--max-shard-size applies to --format safetensors only")
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise CommandError(str(e)) from None
    with options_as_flags(_FLAGS):
        plan = plan_export(
            args.url,
            keys=args.keys,
            strip_prefix=args.strip_prefix,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            storage_options=options,
            trust_pickle=args.trust_pickle,
        )
    if args.format == "safetensors" and plan.values and not args.quiet:
        shown = ", ".join(name for name, _ in plan.values[:10])
        more = f" and {len(plan.values) - 10} more" if len(plan.values) > 10 else ""
        print(
            f"torch-ucp export: skipped {plural(len(plan.values), 'non-tensor value')} (safetensors "
            f"holds tensors only): {shown}{more}",
            file=sys.stderr,
        )
    try:
        with options_as_flags(_FLAGS), progress(args, plan.nbytes, "export") as update:
            if args.format == "safetensors":
                result = export_safetensors(
                    plan,
                    args.out,
                    max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite,
                    storage_options=options,
                    progress=update,
                )
                files = result.files
                shown = files if len(files) <= 4 else [files[0], "...", *files[-2:]]
                where = args.out
                if not args.out.endswith(".safetensors"):
                    where += f" ({plural(len(files), 'file')}: {', '.join(shown)})"
                kept = ""
            else:
                result = export_torch(plan, args.out, overwrite=args.overwrite, progress=update)
                where = result.out
                kept = f", {plural(len(result.values), 'value')}"
    except CheckpointError:
        raise
    except OSError as e:
        raise CommandError(" ".join(f"cannot write {args.out}: {e}".split())) from e
    print(
        f"exported {plural(result.tensors, 'tensor')} ({human_bytes(result.nbytes)}){kept} from "
        f"{result.source_format} checkpoint {args.url} to {where}"
    )
    return 0
