"""Non-tensor values as bytes, without pickle: the ``raw``, ``json`` and ``cbor`` encodings.

Every value ordinary training state holds is stored without pickle, in the first encoding that
represents it exactly (docs/FORMAT.md, "Value encodings", is the byte-level specification):

- ``raw``: a ``bytes`` value, as is;
- ``json``: UTF-8 JSON of values JSON round-trips unchanged: ``None``, ``bool``, 64-bit ``int``,
  finite ``float``, ``str``, and ``list`` / ``dict`` (``str`` keys) of them;
- ``cbor``: CBOR (RFC 8949, :mod:`torch_ucp.metadata.cbor`) for the rest, with tag 27 ("object
  with type name and constructor arguments") for the types CBOR lacks: ``tuple``, ``bytearray``,
  ``set``, ``frozenset``, ``OrderedDict``, ``complex``, ``torch.Size``, ``torch.dtype``,
  ``torch.device``, ``torch.memory_format`` / ``layout`` / ``qscheme``, enums of torch modules,
  dense CPU-copyable tensors, and numpy arrays and scalars of numeric dtypes. Integers of any
  size use CBOR's bignums; floats keep their exact bits (``inf``, ``nan``, ``-0.0``).

Anything else is refused at save with an error naming the key, the place inside the value and
the type, unless the writer was given ``allow_pickle=True``: then it is stored with
``torch.save`` (encoding ``torch_save``), and reading it needs ``allow_pickle=True`` too, because
unpickling runs whatever code the bytes name. Nothing here unpickles without that opt-in.
"""

from __future__ import annotations

import collections
import enum
import io
import json
import pickle
import sys
from typing import Any

import numpy as np
import torch

from torch_ucp.errors import CorruptCheckpointError, UnsafeCheckpointError
from torch_ucp.metadata.cbor import MAX_DEPTH, OBJECT_TAG, CBORError, Tag, dumps, loads

RAW, JSON, CBOR, TORCH_SAVE = "raw", "json", "cbor", "torch_save"
ENCODINGS = (RAW, JSON, CBOR, TORCH_SAVE)

_INT64 = 1 << 63
_TORCH_SINGLETONS = {
    "torch.memory_format": torch.memory_format,
    "torch.layout": torch.layout,
    "torch.qscheme": torch.qscheme,
}
_NUMPY_KINDS = frozenset("biufc")  # bool, int, uint, float, complex: plain bytes, no objects


# -- encoding ---------------------------------------------------------------------------------
def encode_value(value: Any, *, name: str = "value", allow_pickle: bool = False) -> tuple[str, bytes]:
    """``(encoding, payload)`` of a non-tensor value (see the module docstring).

    Raises :class:`~torch_ucp.errors.UnsafeCheckpointError` for a value with no pickle-free
    encoding unless ``allow_pickle``.
    """
    if type(value) is bytes:
        return RAW, value
    if isinstance(value, memoryview):
        return RAW, value.tobytes()
    if _json_exact(value, 0):
        return JSON, json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    try:
        return CBOR, dumps(value, default=_to_tag)
    except CBORError as e:
        if not allow_pickle:
            where = f" (at {name}{e.path})" if e.path else ""
            raise UnsafeCheckpointError(
                f"cannot save value {name!r} without pickle{where}: {e}. torch_ucp stores "
                "None, bool, int, float, str, bytes, bytearray, tuple, list, dict, set, "
                "OrderedDict, complex, torch.Size/dtype/device/memory_format/layout, enums of "
                "torch, tensors and numpy arrays. Convert it, or pass allow_pickle=True to the "
                "writer to store it with torch.save (loading it then needs allow_pickle=True)"
            ) from None
    buf = io.BytesIO()
    torch.save(value, buf)
    return TORCH_SAVE, buf.getvalue()


def _json_exact(v: Any, depth: int) -> bool:
    """Whether JSON gives ``v`` back with the same value and the same types."""
    t = type(v)
    if v is None or t is bool or t is str:
        return True
    if t is int:
        return -_INT64 <= v < _INT64
    if t is float:
        return v - v == 0.0  # finite
    if depth >= MAX_DEPTH:
        return False
    if t is list:
        return all(_json_exact(x, depth + 1) for x in v)
    if t is dict:
        return all(type(k) is str and _json_exact(x, depth + 1) for k, x in v.items())
    return False


def _obj(name: str, *args: Any) -> Tag:
    return Tag(OBJECT_TAG, [name, *args])


def _to_tag(v: Any, path: str) -> Tag:
    """Tag-27 form of a value CBOR has no native type for (``CBORError`` if none)."""
    t = type(v)
    if t is tuple:
        return _obj("tuple", *v)
    if t is bytearray:
        return _obj("bytearray", bytes(v))
    if t is set or t is frozenset:
        return _obj(t.__name__, *v)
    if t is collections.OrderedDict:
        return _obj("OrderedDict", dict(v))
    if t is complex:
        return _obj("complex", v.real, v.imag)
    if t is torch.Size:
        return _obj("torch.Size", *(int(s) for s in v))
    if t is torch.dtype:
        return _obj("torch.dtype", str(v).removeprefix("torch."))
    if t is torch.device:
        return _obj("torch.device", str(v))
    for kind, cls in _TORCH_SINGLETONS.items():
        if t is cls:
            return _obj(kind, str(v).removeprefix("torch."))
    if isinstance(v, enum.Enum) and _is_torch_module(t.__module__):
        return _obj("enum", t.__module__, t.__qualname__, v.name)
    if t is torch.Tensor or t is torch.nn.Parameter:
        return _tensor_tag(v, path)
    if t is np.ndarray and v.dtype.kind in _NUMPY_KINDS:
        return _obj("numpy.ndarray", v.dtype.str, list(v.shape), np.ascontiguousarray(v).tobytes())
    if isinstance(v, np.generic) and v.dtype.kind in _NUMPY_KINDS:
        return _obj("numpy.scalar", v.dtype.str, v.tobytes())
    raise CBORError(f"type {_type_name(t)} has no pickle-free encoding", path)


def _tensor_tag(t: torch.Tensor, path: str) -> Tag:
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type == "meta":
        raise CBORError(f"a {t.layout} / quantized / nested / meta tensor has no pickle-free "
                        "encoding (plain dense tensors only)", path)
    data = t.detach().cpu().contiguous()
    payload = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    args: list[Any] = [str(t.dtype).removeprefix("torch."), list(t.shape), payload]
    name = "torch.nn.Parameter" if type(t) is torch.nn.Parameter else "torch.Tensor"
    if t.requires_grad:
        args.append(True)
    return _obj(name, *args)


def _is_torch_module(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# -- decoding ---------------------------------------------------------------------------------
def decode_value(
    encoding: str, data: bytes, name: str = "value", *, allow_pickle: bool = False
) -> Any:
    """The value stored as ``data`` with ``encoding``.

    Raises :class:`~torch_ucp.errors.CorruptCheckpointError` for malformed bytes and
    :class:`~torch_ucp.errors.UnsafeCheckpointError` for ``torch_save`` without ``allow_pickle``.
    """
    if encoding == RAW:
        return data
    if encoding == JSON:
        try:
            return json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise CorruptCheckpointError(f"value {name!r}: malformed JSON ({e})") from None
    if encoding == CBOR:
        try:
            return loads(data, tag_hook=_from_tag)
        except CBORError as e:
            raise CorruptCheckpointError(f"value {name!r}: malformed CBOR ({e})") from None
    if encoding == TORCH_SAVE:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"value {name!r} is stored with torch.save (encoding 'torch_save'): loading it "
                "unpickles, which runs whatever code the checkpoint names. Only if you trust "
                "this checkpoint, pass allow_pickle=True (UCPReader, open_checkpoint, "
                "UCPLoadPlanner; --trust-pickle on the command line)"
            )
        return torch.load(io.BytesIO(data), weights_only=False)
    raise CorruptCheckpointError(
        f"value {name!r}: unknown value encoding {encoding!r} (known: {', '.join(ENCODINGS)})"
    )


def load_torch_save(data: Any, name: str, *, allow_pickle: bool, opt_in: str) -> Any:
    """A value stock DCP stored with ``torch.save`` (a file-like object or bytes): loaded with
    ``weights_only=True`` (plain containers, numbers, strings, tensors), and with full
    unpickling only if ``allow_pickle``. ``opt_in`` names the option in the error."""
    buf = data if hasattr(data, "read") else io.BytesIO(data)
    start = buf.tell()
    try:
        return torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"value {name!r} needs full unpickling, which runs whatever code the checkpoint "
                f"names ({str(e).splitlines()[0]}). Only if you trust this checkpoint, pass "
                f"{opt_in}"
            ) from None
    buf.seek(start)
    return torch.load(buf, weights_only=False)


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _from_tag(number: int, content: Any) -> Any:
    if number != OBJECT_TAG:
        raise CBORError(f"unknown tag {number}")
    if type(content) is not list or not content or type(content[0]) is not str:
        raise CBORError("tag 27 must hold [type name, arguments...]")
    kind, args = content[0], content[1:]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise CBORError(f"unknown type name {kind!r} in tag 27")
    try:
        return decoder(*args)
    except CBORError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise CBORError(f"bad arguments for {kind!r}: {type(e).__name__}: {e}") from None


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CBORError(what)


def _ints(args: tuple[Any, ...], what: str) -> list[int]:
    _expect(all(type(a) is int and a >= 0 for a in args), f"{what} must be non-negative ints")
    return list(args)


def _bytearray(*args: Any) -> bytearray:
    _expect(len(args) == 1 and type(args[0]) is bytes, "bytearray takes one byte string")
    return bytearray(args[0])


def _ordered(*args: Any) -> collections.OrderedDict:
    _expect(len(args) == 1 and type(args[0]) is dict, "OrderedDict takes one map")
    return collections.OrderedDict(args[0])


def _complex(*args: Any) -> complex:
    _expect(len(args) == 2 and all(type(a) is float for a in args), "complex takes two floats")
    return complex(args[0], args[1])


def _torch_name(kind: str, cls: type) -> Any:
    def decode(*args: Any) -> Any:
        _expect(len(args) == 1 and type(args[0]) is str, f"{kind} takes one name")
        value = vars(torch).get(args[0])  # no getattr: torch imports submodules lazily
        _expect(type(value) is cls, f"torch.{args[0]} is not a {kind}")
        return value

    return decode


def _device(*args: Any) -> torch.device:
    _expect(len(args) == 1 and type(args[0]) is str, "torch.device takes one string")
    return torch.device(args[0])


def _enum(*args: Any) -> enum.Enum:
    _expect(len(args) == 3 and all(type(a) is str for a in args), "enum takes module, class, member")
    module, qualname, member = args
    _expect(_is_torch_module(module), f"enum of module {module!r}: only enums of torch are read")
    obj: Any = sys.modules.get(module)  # never imported here: only modules already loaded
    _expect(obj is not None, f"module {module!r} of enum {qualname} is not imported")
    for part in qualname.split("."):
        obj = obj.__dict__.get(part) if hasattr(obj, "__dict__") else None
    _expect(isinstance(obj, type) and issubclass(obj, enum.Enum), f"{module}.{qualname} is not an enum")
    found = obj.__members__.get(member)
    _expect(found is not None, f"{module}.{qualname} has no member {member!r}")
    return found


def _dtype(name: Any) -> torch.dtype:
    _expect(type(name) is str, "dtype name must be a string")
    dtype = vars(torch).get(name)
    _expect(type(dtype) is torch.dtype, f"torch.{name} is not a dtype")
    return dtype


def _tensor(kind: str):
    def decode(*args: Any) -> torch.Tensor:
        _expect(len(args) in (3, 4), f"{kind} takes dtype, shape, data[, requires_grad]")
        dtype, shape, data = _dtype(args[0]), args[1], args[2]
        _expect(type(shape) is list, "shape must be an array")
        shape = _ints(tuple(shape), "shape")
        _expect(type(data) is bytes, "tensor data must be a byte string")
        requires_grad = len(args) == 4 and args[3] is True
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        _expect(numel * itemsize == len(data),
                f"{len(data)} data bytes for a {dtype} tensor of shape {shape}")
        t = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        t = t.reshape(shape)
        if kind == "torch.nn.Parameter":
            return torch.nn.Parameter(t, requires_grad=requires_grad)
        return t.requires_grad_(requires_grad) if requires_grad else t

    return decode


def _np_dtype(code: Any) -> np.dtype:
    _expect(type(code) is str and len(code) <= 8, "numpy dtype must be a short string")
    dtype = np.dtype(code)
    _expect(dtype.kind in _NUMPY_KINDS and dtype.fields is None and dtype.shape == (),
            f"numpy dtype {code!r} is not a plain numeric dtype")
    return dtype


def _ndarray(*args: Any) -> np.ndarray:
    _expect(len(args) == 3, "numpy.ndarray takes dtype, shape, data")
    dtype = _np_dtype(args[0])
    _expect(type(args[1]) is list, "shape must be an array")
    shape = _ints(tuple(args[1]), "shape")
    _expect(type(args[2]) is bytes, "array data must be a byte string")
    numel = 1
    for s in shape:
        numel *= s
    _expect(numel * dtype.itemsize == len(args[2]), f"{len(args[2])} data bytes for {dtype} {shape}")
    return np.frombuffer(args[2], dtype=dtype).reshape(shape).copy()


def _np_scalar(*args: Any) -> np.generic:
    _expect(len(args) == 2 and type(args[1]) is bytes, "numpy.scalar takes dtype, data")
    dtype = _np_dtype(args[0])
    _expect(len(args[1]) == dtype.itemsize, "numpy scalar data has the wrong size")
    return np.frombuffer(args[1], dtype=dtype)[0]


_DECODERS: dict[str, Any] = {
    "tuple": lambda *a: tuple(a),
    "bytearray": _bytearray,
    "set": lambda *a: set(a),
    "frozenset": lambda *a: frozenset(a),
    "OrderedDict": _ordered,
    "complex": _complex,
    "torch.Size": lambda *a: torch.Size(_ints(a, "torch.Size")),
    "torch.dtype": lambda name: _dtype(name),
    "torch.device": _device,
    **{kind: _torch_name(kind, cls) for kind, cls in _TORCH_SINGLETONS.items()},
    "enum": _enum,
    "torch.Tensor": _tensor("torch.Tensor"),
    "torch.nn.Parameter": _tensor("torch.nn.Parameter"),
    "numpy.ndarray": _ndarray,
    "numpy.scalar": _np_scalar,
}
