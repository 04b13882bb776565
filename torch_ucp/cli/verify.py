"""``torch-ucp verify URL``: check metadata, coverage, object sizes and every checksum."""

from __future__ import annotations

import argparse
import json

from torch_ucp.cli.common import add_storage_arguments, progress, storage_options
from torch_ucp.errors import CheckpointError
from torch_ucp.sizes import human_bytes
from torch_ucp.storage.reader import load_metadata
from torch_ucp.storage.store import open_store
from torch_ucp.verify import verify_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="checkpoint folder: path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    try:
        total = load_metadata(open_store(args.url, options)).total_tensor_bytes
    except (CheckpointError, OSError):  # a damaged checkpoint: verify_checkpoint reports it
        total = None  # (and any other error, e.g. an unreachable endpoint, ends here at once)
    with progress(args, total, "verify") as update:
        report = verify_checkpoint(args.url, progress=update, **options)
    if args.json:
        print(json.dumps(report.__dict__ | {"ok": report.ok}, indent=2))
    else:
        for problem in report.problems:
            print(f"PROBLEM: {problem}")
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
        print(
            f"{status}: {args.url}: {report.tensors} tensors, {report.fragments} fragments, "
            f"{report.values} values, {human_bytes(report.bytes_checked)} checked"
        )
    return 0 if report.ok else 1
