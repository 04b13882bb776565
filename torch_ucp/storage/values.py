"""Encoding of non-tensor values as bytes entries, without pickle where possible.

``bytes`` are stored raw, values that survive a JSON round trip unchanged (ints, floats, strings,
bools, None, and lists/dicts of them with string keys) as UTF-8 JSON, anything else with
``torch.save`` framing, recorded as such so a reader knows it must unpickle.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch


def encode_value(value: Any) -> tuple[str, bytes]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "raw", bytes(value)
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
        if json.loads(text) == value and _same_types(json.loads(text), value):
            return "json", text.encode()
    except (TypeError, ValueError):
        pass
    buf = io.BytesIO()
    torch.save(value, buf)
    return "torch_save", buf.getvalue()


def _same_types(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return all(_same_types(a[k], b[k]) for k in a)
    return True


def decode_value(encoding: str, data: bytes, name: str = "value") -> Any:
    if encoding == "raw":
        return data
    if encoding == "json":
        return json.loads(data)
    if encoding == "torch_save":
        # Written by torch_ucp for values JSON cannot hold (the metadata says so); loading needs
        # full unpickling, as stock DCP does for every non-tensor value.
        return torch.load(io.BytesIO(data), weights_only=False)
    raise ValueError(f"{name}: unknown value encoding {encoding!r}")
