"""Parse JSON read from a checkpoint with bounded memory and one kind of error.

Metadata comes from storage and may be damaged or hostile. Every way ``json.loads`` can fail on
bytes (invalid UTF-8, nesting deep enough to exhaust the recursion limit, integers past
Python's digit limit, syntax errors) becomes :class:`~torch_ucp.errors.UnsupportedFormatError`
naming the object; ``NaN``/``Infinity`` (not JSON) are refused; the size is checked before
parsing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from torch_ucp.errors import UnsupportedFormatError

MAX_INT_DIGITS = 40  # no field of the format needs more (64-bit values have at most 20)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise ValueError(f"a number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes | memoryview, source: str, *, max_bytes: int) -> Any:
    """The JSON value in ``data`` (UTF-8), or ``UnsupportedFormatError`` naming ``source``."""
    if len(data) > max_bytes:
        raise UnsupportedFormatError(
            f"{source} is {len(data)} bytes, more than the {max_bytes} allowed for metadata "
            "(TORCH_UCP_MAX_METADATA_BYTES)"
        )
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise UnsupportedFormatError(f"{source}: metadata is not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise UnsupportedFormatError(f"{source}: metadata is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError and the parse hooks above
        raise UnsupportedFormatError(f"{source}: metadata is not valid JSON ({e})") from None
