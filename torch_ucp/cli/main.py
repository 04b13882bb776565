"""The ``torch-ucp`` command line."""

from __future__ import annotations

import argparse
import sys


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
