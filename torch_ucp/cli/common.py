"""Option handling shared by every ``torch-ucp`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch_ucp.errors import CheckpointError, OptionError
from torch_ucp.sizes import byte_unit


class CommandError(Exception):
    """A usage error: printed as one line, exit status 2 (checkpoint errors exit 1)."""


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 value"``, ``"2 values"``."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


@contextmanager
def options_as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a :class:`~torch_ucp.errors.OptionError` of a :mod:`torch_ucp.tools` call as a
    usage error naming the command's flag (``flags``: Python keyword -> flag or metavar)."""
    try:
        yield
    except OptionError as e:
        raise CommandError(e.render(lambda option, value: _flag(flags.get(option, option), value))) from None


def _flag(flag: str, value: Any) -> str:
    """``--overwrite``, ``--keys a b``, ``--strip-prefix 'model.'``."""
    if value is None or value is True or not flag.startswith("-"):
        return flag
    if isinstance(value, (list, tuple)):
        return " ".join([flag, *map(str, value)])
    return f"{flag} {value!r}"


def add_keys_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--keys GLOB ...``: shell patterns selecting keys (``help_text`` says what for)."""
    parser.add_argument("--keys", nargs="+", action="extend", metavar="GLOB", help=help_text)


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for the URL (repeatable), e.g. -o endpoint_url=http://"
        "127.0.0.1:9000 -o anon=false; VALUE is parsed as JSON when it can be. The usual "
        "s3fs / botocore environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...) "
        "work unchanged.",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-pickle``: the opt-in to unpickle what a checkpoint holds (stock DCP metadata,
    values stored with torch.save), which runs any code the checkpoint names."""
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle what the checkpoint stores as pickle: a stock DCP .metadata and values "
        "saved with torch.save. Unpickling runs any code the file names: only for checkpoints "
        "you trust (torch_ucp checkpoints of plain values never need it)",
    )


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--storage-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@contextmanager
def progress(args: argparse.Namespace, total: int | None, desc: str) -> Iterator[Any]:
    """A tqdm bar on stderr when it is a terminal and not ``--quiet``; else a no-op.

    Sizes are in the unit the command's summary line uses for ``total`` (MiB, GiB: see
    :func:`torch_ucp.sizes.human_bytes`), so the bar and the summary agree.
    """
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    unit, size = byte_unit(total)
    counts = "{n:.2f}/{total:.2f} {unit}" if total is not None else "{n:.2f} {unit}"
    with tqdm(
        total=total / size if total is not None else None,
        desc=desc,
        unit=unit,
        bar_format="{l_bar}{bar}| " + counts + " [{elapsed}<{remaining}, {rate_fmt}]",
        file=sys.stderr,
    ) as bar:
        yield lambda n: bar.update(n / size)


class LogFormatter(logging.Formatter):
    """``torch-ucp: <message>``: one prefix, also for library messages that carry their own
    ``torch_ucp:``."""

    def format(self, record: logging.LogRecord) -> str:
        return "torch-ucp: " + super().format(record).removeprefix("torch_ucp: ")


def one_line(error: BaseException) -> str:
    """An error as one line: its message with line breaks folded (type name added when the
    message alone may not say what failed)."""
    summary = getattr(error, "summary", None)
    text = summary if isinstance(summary, str) else str(error)
    text = "; ".join(part.strip() for part in text.splitlines() if part.strip()) or repr(error)
    if isinstance(error, (CommandError, CheckpointError)):
        return text
    return f"{type(error).__name__}: {text}"
