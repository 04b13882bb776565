"""A strict, bounded CBOR (RFC 8949) codec for the data model torch_ucp stores values in.

Only definite-length items are written and read: unsigned and negative integers (major types 0
and 1; beyond 64 bits the standard bignum tags 2 and 3), byte strings (2), UTF-8 text strings
(3), arrays (4), maps (5), tags (6), ``false``/``true``/``null`` and floats (7; written as 64-bit
floats, read in any width). Decoding never trusts a length: a string or container cannot claim
more items than there are bytes left, nesting is limited to :data:`MAX_DEPTH`, and trailing bytes,
indefinite lengths, invalid UTF-8 and unknown simple values are errors. Tags other than 2 and 3
are handed to the caller's ``tag_hook``; nothing is ever executed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 100  # containers nested deeper than this are refused on both sides
OBJECT_TAG = 27  # RFC 8949 registry: "object with type name and constructor arguments"


class CBORError(ValueError):
    """Malformed or unsupported CBOR, or a value outside the data model (``path`` locates it)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Tag:
    """A tagged item: ``number`` and its content."""

    number: int
    value: Any


def _path(parts: list[Any]) -> str:
    return "".join(f"[{p!r}]" for p in parts)


def _head(out: bytearray, major: int, n: int) -> None:
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes((major << 5 | 24, n))
    elif n < 1 << 16:
        out.append(major << 5 | 25)
        out += n.to_bytes(2, "big")
    elif n < 1 << 32:
        out.append(major << 5 | 26)
        out += n.to_bytes(4, "big")
    else:
        out.append(major << 5 | 27)
        out += n.to_bytes(8, "big")


def dumps(value: Any, default: Callable[[Any, str], Tag] | None = None) -> bytes:
    """Encode ``value``. ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
    ``dict`` (exact types) and :class:`Tag` are native; anything else goes to ``default(obj,
    path)``, which returns a :class:`Tag` or raises :class:`CBORError`."""
    out = bytearray()
    path: list[Any] = []

    def enc(v: Any, depth: int) -> None:
        t = type(v)
        if v is None:
            out.append(0xF6)
        elif t is bool:
            out.append(0xF5 if v else 0xF4)
        elif t is int:
            if 0 <= v < 1 << 64:
                _head(out, 0, v)
            elif -(1 << 64) <= v < 0:
                _head(out, 1, -1 - v)
            else:  # bignum: tag 2 (n >= 0) or 3 (-1 - n), big-endian magnitude
                n = v if v >= 0 else -1 - v
                _head(out, 6, 2 if v >= 0 else 3)
                magnitude = n.to_bytes((n.bit_length() + 7) // 8, "big")
                _head(out, 2, len(magnitude))
                out.extend(magnitude)
        elif t is float:
            out.append(0xFB)
            out.extend(struct.pack(">d", v))
        elif t is str:
            try:
                data = v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise CBORError(f"string is not valid Unicode ({e.reason})", _path(path)) from None
            _head(out, 3, len(data))
            out.extend(data)
        elif t is bytes:
            _head(out, 2, len(v))
            out.extend(v)
        elif t is list or t is dict or t is Tag:
            if depth >= MAX_DEPTH:
                raise CBORError(f"nested deeper than {MAX_DEPTH} levels", _path(path))
            if t is list:
                _head(out, 4, len(v))
                for i, item in enumerate(v):
                    path.append(i)
                    enc(item, depth + 1)
                    path.pop()
            elif t is dict:
                _head(out, 5, len(v))
                for key, item in v.items():
                    path.append(key)
                    enc(key, depth + 1)
                    enc(item, depth + 1)
                    path.pop()
            else:
                _head(out, 6, v.number)
                if v.number == OBJECT_TAG and type(v.value) is list:
                    enc_object(v.value, depth + 1)
                else:
                    enc(v.value, depth + 1)
        elif default is not None:
            enc(default(v, _path(path)), depth)
        else:
            raise CBORError(f"{t.__name__} is not in the CBOR data model", _path(path))

    def enc_object(items: list[Any], depth: int) -> None:
        """Tag 27's ``[type name, arguments...]``: in error paths, the arguments are the
        object's items (and an ``OrderedDict``'s one map argument is the object itself)."""
        _head(out, 4, len(items))
        for i, item in enumerate(items):
            # Only the OrderedDict's map: a tuple of one dict is an item, at [0].
            own = i == 0 or (len(items) == 2 and type(item) is dict and items[0] == "OrderedDict")
            if not own:
                path.append(i - 1)
            enc(item, depth)
            if not own:
                path.pop()

    enc(value, 0)
    return bytes(out)


def loads(data: bytes | memoryview, tag_hook: Callable[[int, Any], Any] | None = None) -> Any:
    """Decode exactly one item filling ``data``. Tags 2/3 become ints; any other tag becomes
    ``tag_hook(number, content)`` (``CBORError`` without a hook). Map keys must be hashable."""
    view = memoryview(data).cast("B")
    end = len(view)
    pos = 0

    def need(n: int) -> None:
        if n > end - pos:
            raise CBORError(f"truncated: {n} more bytes needed at offset {pos}, {end - pos} left")

    def argument(ai: int) -> int:
        nonlocal pos
        if ai < 24:
            return ai
        if ai > 27:
            raise CBORError(f"unsupported additional information {ai} at offset {pos - 1} "
                            "(indefinite lengths are not allowed)")
        size = 1 << (ai - 24)
        need(size)
        n = int.from_bytes(view[pos : pos + size], "big")
        pos += size
        return n

    def dec(depth: int) -> Any:
        nonlocal pos
        need(1)
        initial = view[pos]
        pos += 1
        major, ai = initial >> 5, initial & 31
        if major == 7:
            if ai == 20:
                return False
            if ai == 21:
                return True
            if ai == 22:
                return None
            if ai in (25, 26, 27):
                size = {25: 2, 26: 4, 27: 8}[ai]
                need(size)
                (v,) = struct.unpack({2: ">e", 4: ">f", 8: ">d"}[size], view[pos : pos + size])
                pos += size
                return float(v)
            raise CBORError(f"unsupported simple value {ai} at offset {pos - 1}")
        n = argument(ai)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major in (2, 3):
            need(n)
            raw = bytes(view[pos : pos + n])
            pos += n
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CBORError(f"text string is not valid UTF-8 ({e.reason})") from None
        if depth >= MAX_DEPTH:
            raise CBORError(f"nested deeper than {MAX_DEPTH} levels")
        if major == 4:
            need(n)  # every item takes at least one byte
            return [dec(depth + 1) for _ in range(n)]
        if major == 5:
            need(2 * n)
            out: dict[Any, Any] = {}
            for _ in range(n):
                key = dec(depth + 1)
                try:
                    hash(key)
                except TypeError:
                    raise CBORError(f"map key of type {type(key).__name__} is not hashable") from None
                out[key] = dec(depth + 1)
            return out
        # major == 6: a tag
        content = dec(depth + 1)
        if n in (2, 3):
            if type(content) is not bytes:
                raise CBORError(f"bignum tag {n} must hold a byte string")
            magnitude = int.from_bytes(content, "big")
            return magnitude if n == 2 else -1 - magnitude
        if tag_hook is None:
            raise CBORError(f"unknown tag {n}")
        return tag_hook(n, content)

    value = dec(0)
    if pos != end:
        raise CBORError(f"{end - pos} trailing bytes after the value")
    return value

