"""torch-ucp ls URL: the step-N checkpoints of a run folder, committed or not.

For each step folder: whether it is committed (its .metadata exists) or incomplete (a save
in progress or a failed one), and for committed ones the tensor bytes, save time, world size
and save id. --latest prints only the URL of the newest committed checkpoint (exit status 1
if there is none), for scripts.

Examples:
  torch-ucp ls ./run
  torch-ucp ls s3://bucket/run -o endpoint_url=http://127.0.0.1:9000 --json
  CKPT=$(torch-ucp ls ./run --latest) && python train.py --resume "$CKPT"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from torch_ucp.cli.common import CommandError, add_storage_arguments, storage_options
from torch_ucp.cli.inspect import plural
from torch_ucp.management import StepCheckpoint, latest_checkpoint, list_checkpoints
from torch_ucp.sizes import human_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="run folder holding step-N checkpoints: path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.add_argument(
        "--latest", action="store_true", help="print only the URL of the newest committed checkpoint"
    )
    add_storage_arguments(parser)


def _saved(c: StepCheckpoint) -> str:
    if c.created is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.created))


def render(url: str, checkpoints: list[StepCheckpoint]) -> str:
    if not checkpoints:
        return f"{url}: no step-N checkpoints"
    rows = [["step", "status", "size", "saved (UTC)", "world size", "save id"]]
    for c in checkpoints:
        status = "incomplete" if not c.committed else "committed*" if c.error else "committed"
        rows.append([
            str(c.step),
            status,
            human_bytes(c.nbytes) if c.nbytes is not None else "-",
            _saved(c),
            str(c.world_size) if c.world_size is not None else "-",
            c.save_id or "-",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[i].rjust(widths[i]) if i in (0, 2, 4) else r[i].ljust(widths[i]) for i in range(len(r))]
        lines.append("  ".join(cells).rstrip())
    committed = sum(c.committed for c in checkpoints)
    incomplete = len(checkpoints) - committed
    lines.append("")
    lines.append(
        f"{plural(committed, 'committed checkpoint')}"
        + (f", {incomplete} incomplete (a save in progress or a failed one)" if incomplete else "")
    )
    lines.extend(f"* step {c.step}: {c.error}" for c in checkpoints if c.error)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    if args.latest:
        latest = latest_checkpoint(args.url, **options)
        if latest is None:
            raise CommandError(f"no committed step-N checkpoint under {args.url}")
        print(json.dumps(dataclasses.asdict(latest)) if args.json else latest.url)
        return 0
    checkpoints = list_checkpoints(args.url, **options)
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checkpoints], indent=2))
    else:
        print(render(args.url, checkpoints))
    return 0
