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

The same --storage-option values apply to SRC and DST. This is the command line of
torch_ucp.tools.convert_checkpoint.

Examples:
  torch-ucp convert ./dcp-step-100 s3://bucket/run/step-100 -o endpoint_url=http://127.0.0.1:9000
  torch-ucp convert ./ds_ckpt/global_step10_universal ./ucp-step-10
"""

from __future__ import annotations

import argparse

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
from torch_ucp.errors import CheckpointError, CheckpointExistsError, OptionError
from torch_ucp.sizes import human_bytes
from torch_ucp.tools import convert_checkpoint, plan_export

_FLAGS = {"dst": "DST", "keys": "--keys", "overwrite": "--overwrite"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint to convert: path or fsspec URL")
    parser.add_argument("dst", metavar="DST", help="torch_ucp checkpoint to write: path or fsspec URL")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a committed checkpoint at DST (it stays loadable until the new one commits)",
    )
    add_keys_argument(
        parser,
        "convert only keys matching any of these shell patterns (give it after SRC DST)",
    )
    add_trust_argument(parser)
    add_storage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    with options_as_flags(_FLAGS):
        plan = plan_export(args.src, keys=args.keys, storage_options=options, trust_pickle=args.trust_pickle)
        try:
            with progress(args, plan.nbytes, "convert") as update:
                result = convert_checkpoint(
                    plan, args.dst, overwrite=args.overwrite, storage_options=options,
                    trust_pickle=args.trust_pickle, progress=update,
                )
        except CheckpointExistsError:
            raise CheckpointExistsError(
                f"{args.dst} already holds a committed checkpoint; pass --overwrite to replace it"
            ) from None
        except (CheckpointError, OptionError):
            raise
        except (OSError, ValueError, TypeError) as e:
            raise CommandError(" ".join(f"cannot convert to {args.dst}: {e}".split())) from e
    print(
        f"converted {result.source_format} checkpoint {args.src} -> torch_ucp checkpoint {args.dst}: "
        f"{plural(result.tensors, 'tensor')} ({human_bytes(result.nbytes)}), "
        f"{plural(result.values, 'value')}, "
        f"save id {result.save_id}"
    )
    return 0
