"""The ``torch-ucp`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from torch_ucp.cli.common import CommandError, LogFormatter, one_line


def _version() -> str:
    import torch

    from torch_ucp import __version__

    return f"torch-ucp {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-ucp",
        description="Universal checkpointing for PyTorch distributed training.",
        epilog="torch-ucp COMMAND --help describes each command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from torch_ucp.cli import convert, export, inspect, ls, prune, verify
    from torch_ucp.demo import run as demo

    commands = [
        ("demo", demo, "train on FSDP2 x TP, save, reload on 3 other layouts and verify bit-exactly"),
        ("inspect", inspect, "list every key with dtype, shape, bytes, fragments/chunks and saved layout"),
        ("export", export, "write consolidated tensors as safetensors (HF sharded) or one torch.save file"),
        ("convert", convert, "convert a stock DCP, DeepSpeed universal, safetensors or torch_ucp "
         "checkpoint into the torch_ucp format"),
        ("verify", verify, "check a checkpoint: metadata, coverage, object sizes, every checksum"),
        ("ls", ls, "list the step-N checkpoints of a run folder: committed or not, size, time"),
        ("prune", prune, "delete all but the K newest committed step-N checkpoints of a run folder"),
    ]
    for name, module, help_text in commands:
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        # also after the command; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
        p.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # retries and cleanup are logged as warnings; one short line each, none with --quiet
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter("%(message)s"))
    logging.basicConfig(
        level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
        handlers=[handler],
    )
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"torch-ucp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        hint = "" if isinstance(e, CommandError) or _is_checkpoint_error(e) else " (--debug shows the traceback)"
        print(f"torch-ucp {args.command}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 2 if isinstance(e, CommandError) else 1


def _is_checkpoint_error(e: BaseException) -> bool:
    from torch_ucp.errors import CheckpointError

    return isinstance(e, CheckpointError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
