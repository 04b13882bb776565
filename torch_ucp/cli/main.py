"""The ``torch-ucp`` command line."""

from __future__ import annotations

import argparse
import sys

from torch_ucp.cli.common import CommandError
from torch_ucp.errors import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-ucp", description="Universal checkpointing for PyTorch distributed training."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from torch_ucp.demo import run as demo

    p = sub.add_parser(
        "demo",
        help="train on FSDP2 x TP, save, reload on 3 other layouts and verify bit-exactly",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(p)
    p.set_defaults(handler=demo.main)

    from torch_ucp.cli import verify

    p = sub.add_parser(
        "verify",
        help="check a checkpoint: metadata, coverage, object sizes, every checksum",
        description=verify.__doc__,
    )
    verify.add_arguments(p)
    p.set_defaults(handler=verify.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
