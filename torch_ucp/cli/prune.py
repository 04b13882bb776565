"""torch-ucp prune URL --keep K: delete all but the K newest committed step-N checkpoints.

Only committed checkpoints older than the K newest committed ones are deleted, so a newer
committed checkpoint always remains; incomplete step folders (a save in progress, whose data
may still be arriving, or a failed one) are never touched. Each checkpoint's .metadata goes
first, then its data, so an interrupted prune never leaves a committed checkpoint with data
missing. --dry-run lists what would be deleted.

Examples:
  torch-ucp prune ./run --keep 3
  torch-ucp prune s3://bucket/run --keep 1 --dry-run -o endpoint_url=http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

from torch_ucp.cli.common import CommandError, add_storage_arguments, storage_options
from torch_ucp.cli.inspect import plural
from torch_ucp.management import list_checkpoints, prune_checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="run folder holding step-N checkpoints: path or fsspec URL")
    parser.add_argument("--keep", type=int, required=True, metavar="K", help="committed checkpoints to keep (>= 1)")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    add_storage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.keep < 1:
        raise CommandError(f"--keep must be at least 1, got {args.keep}")
    options = storage_options(args)
    removed = prune_checkpoints(args.url, args.keep, dry_run=args.dry_run, **options)
    deleted, kept_verb = ("would delete", "would keep") if args.dry_run else ("deleted", "kept")
    for c in removed:
        print(f"{deleted} {c.url}")
    left = list_checkpoints(args.url, read_metadata=False, **options)
    gone = {c.name for c in removed}
    kept = [c.name for c in left if c.committed and c.name not in gone]
    incomplete = [c.name for c in left if not c.committed]
    summary = f"{deleted} {plural(len(removed), 'checkpoint')}; {kept_verb} {plural(len(kept), 'committed checkpoint')}"
    if kept:
        summary += f" ({', '.join(kept)})"
    if incomplete:
        summary += f"; {'would leave' if args.dry_run else 'left'} {len(incomplete)} incomplete alone ({', '.join(incomplete)})"
    print(summary)
    return 0
