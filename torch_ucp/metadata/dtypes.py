"""Stable names for torch dtypes in the on-disk format.

Every dtype ``torch.save`` can store is a format dtype, stored as its raw bytes: a fragment is
``numel * itemsize`` bytes, C order. For the packed types the element is the byte torch stores
(``shape`` counts bytes, as torch's does): ``float4_e2m1fn_x2`` holds two e2m1 values per byte,
``bits1x8`` / ``bits2x4`` / ``bits4x2`` eight / four / two bit fields per byte. torch_ucp never
unpacks them, so a box never splits a byte and every value round-trips bit-exactly.

Not storable, and refused with a reason: torch's sub-byte shells ``int1``..``int7`` /
``uint1``..``uint7`` (placeholders without storage semantics: ``torch.save`` refuses them too)
and the quantized dtypes (``qint8`` ...), whose values need a scale and zero point besides the
bytes.
"""

from __future__ import annotations

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex128": torch.complex128,
    "complex64": torch.complex64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_OPTIONAL = (
    "uint16",
    "uint32",
    "uint64",
    "complex32",  # complex half: two float16
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",  # MX block scales: an 8-bit exponent
    "float4_e2m1fn_x2",  # packed: two e2m1 values per byte
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)
for _name in _OPTIONAL:
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPES[_name] = getattr(torch, _name)

_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_UNCONVERTIBLE = frozenset(
    _DTYPES[n] for n in ("float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2") if n in _DTYPES
)
"""Dtypes torch cannot convert to or from another dtype (it has no cast kernels for them)."""


def _why_not(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name.startswith(("qint", "quint")):
        return (
            f"quantized dtype {dtype} holds a scale and zero point besides its bytes; save "
            "t.int_repr() with t.q_scale() / t.q_zero_point() (or t.dequantize()) instead"
        )
    if name.rstrip("1234567") in ("int", "uint") and name[-1] in "1234567":
        return (
            f"dtype {dtype} is a sub-byte placeholder torch cannot store (torch.save refuses it "
            "too); pack the values into uint8 (or float4_e2m1fn_x2 / bits4x2) first"
        )
    return f"dtype {dtype} is not supported by the torch_ucp format"


def dtype_to_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(_why_not(dtype)) from None


def name_to_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r} in checkpoint metadata; known: {sorted(_DTYPES)}"
        ) from None


def convertible(saved: torch.dtype, target: torch.dtype) -> bool:
    """Whether values saved as ``saved`` can be loaded into a ``target`` tensor: the same
    dtype, or two dtypes torch casts between (packed and bits dtypes load only as themselves)."""
    return saved == target or not (saved in _UNCONVERTIBLE or target in _UNCONVERTIBLE)


def dtype_names() -> list[str]:
    """Every format dtype name this torch has, in the order above."""
    return list(_DTYPES)
