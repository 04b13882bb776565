"""The ``torch-ucp`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from torch_ucp.cli.common import CommandError
from torch_ucp.errors import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-ucp", description="Universal checkpointing for PyTorch distributed training."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from torch_ucp.cli import convert, export, inspect, verify
    from torch_ucp.demo import run as demo

    commands = [
        ("demo", demo, "train on FSDP2 x TP, save, reload on 3 other layouts and verify bit-exactly"),
        ("inspect", inspect, "list every key with dtype, shape, bytes, fragments/chunks and saved layout"),
        ("export", export, "write consolidated tensors as safetensors (HF sharded) or one torch.save file"),
        ("convert", convert, "convert a stock DCP, DeepSpeed universal, safetensors or torch_ucp "
         "checkpoint into the torch_ucp format"),
        ("verify", verify, "check a checkpoint: metadata, coverage, object sizes, every checksum"),
    ]
    for name, module, help_text in commands:
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # retries and cleanup are logged as warnings; one short line each, none with --quiet
    logging.basicConfig(
        level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
        format="torch-ucp: %(message)s",
    )
    try:
        return args.handler(args)
    except CommandError as e:
        print(f"torch-ucp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"torch-ucp {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
