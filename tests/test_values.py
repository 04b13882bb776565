"""Non-tensor values without pickle (torch_ucp.metadata.values, docs/FORMAT.md "Value encodings").

Every value ordinary training state holds round-trips with its exact type; anything else is
refused at save (naming the key, where inside the value, and the type) unless the writer opts in;
malformed bytes give a named CorruptCheckpointError with bounded work, whatever they claim.
"""

from __future__ import annotations

import collections
import math
import random

import numpy as np
import pytest
import torch
from torch.distributed.fsdp import ShardingStrategy

from torch_ucp import CorruptCheckpointError, UnsafeCheckpointError
from torch_ucp.metadata.cbor import MAX_DEPTH, Tag, dumps, loads
from torch_ucp.metadata.values import decode_value, encode_value


def same(a, b) -> bool:
    """Equal values of identical types, recursively (NaN equals NaN, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad and (
            torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes() and a.shape == b.shape
    if isinstance(a, float):
        return a.hex() == b.hex() if not math.isnan(a) else math.isnan(b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


class Point:
    def __init__(self, x):
        self.x = x


VALUES = {
    "none": None,
    "bool": True,
    "int": 1234,
    "int64-min": -(2**63),
    "bigint": 2**300 + 7,
    "neg-bigint": -(2**200),
    "float": 0.1,
    "neg-zero": -0.0,
    "inf": float("-inf"),
    "nan": float("nan"),
    "str": "héllo ☃",
    "bytes": b"\x00\xffraw",
    "bytearray": bytearray(b"\x01\x02"),
    "tuple": (1, (2.5, "x"), ()),
    "list-of-tuples": [(0.9, 0.999), (1,)],
    "dict": {"lr": 1e-3, "betas": (0.9, 0.95), "amsgrad": False, "foreach": None},
    "int-keys": {0: "a", 1: {"b": 2}},
    "tuple-keys": {(1, 2): "p", (): None},
    "set": {3, 1, 2},
    "frozenset": frozenset({"a", "b"}),
    "ordered": collections.OrderedDict([("z", 1), ("a", 2)]),
    "complex": 1.5 - 2j,
    "size": torch.Size([4, 5]),
    "dtype": torch.bfloat16,
    "float8": torch.float8_e4m3fn,
    "device": torch.device("cuda", 3),
    "memory-format": torch.channels_last,
    "layout": torch.sparse_csr,
    "qscheme": torch.per_channel_affine,
    "torch-enum": ShardingStrategy.HYBRID_SHARD,
    "tensor": torch.arange(12, dtype=torch.int16).reshape(3, 4),
    "bf16-scalar": torch.tensor(-1.25, dtype=torch.bfloat16),
    "empty-tensor": torch.zeros(0, 3),
    "grad-tensor": torch.ones(2, requires_grad=True),
    "parameter": torch.nn.Parameter(torch.full((2,), 3.0)),
    "non-contiguous": torch.arange(6.0).reshape(2, 3).t(),
    "rng-state": torch.get_rng_state(),
    "python-rng": random.Random(5).getstate(),
    "numpy-rng": np.random.RandomState(3).get_state(),
    "numpy-scalar": np.float32(2.5),
    "numpy-bool": np.bool_(True),
    "numpy-array": np.arange(6, dtype=">i4").reshape(2, 3),
    "deep": [[[[[1]]]]],
}


@pytest.mark.parametrize("name", list(VALUES))
def test_value_round_trips_without_pickle(name, monkeypatch):
    value = VALUES[name]
    encoding, payload = encode_value(value, name=name)
    assert encoding in ("raw", "json", "cbor")

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", no_pickle)
    got = decode_value(encoding, payload, name)
    if name == "non-contiguous":
        assert same(got, value.contiguous())
    else:
        assert same(got, value), (got, value)


def test_plain_values_stay_json_and_bytes_raw():
    assert encode_value(5)[0] == "json"
    assert encode_value({"a": [1, "x", None, 2.5]})[0] == "json"
    assert encode_value(b"x") == ("raw", b"x")
    assert encode_value((1,))[0] == "cbor"
    assert encode_value(2**64)[0] == "cbor"  # beyond 64 bits: a CBOR bignum, not JSON
    assert encode_value(float("nan"))[0] == "cbor"


@pytest.mark.parametrize(
    "value, where, type_name",
    [
        (Point(1), "", "test_values.Point"),
        ({"opt": [1, {"hook": print}]}, "['opt'][1]['hook']", "builtin_function_or_method"),
        ((1, same), "[1]", "function"),
        (collections.defaultdict(int), "", "collections.defaultdict"),
        (np.array([object()]), "", "numpy.ndarray"),
        (torch.zeros(2).to_sparse(), "", "tensor"),
    ],
)
def test_other_values_are_refused_naming_key_place_and_type(value, where, type_name):
    with pytest.raises(UnsafeCheckpointError) as e:
        encode_value(value, name="train.extra")
    msg = str(e.value)
    assert "'train.extra'" in msg and type_name in msg and "allow_pickle=True" in msg, msg
    if where:
        assert f"train.extra{where}" in msg, msg
    encoding, payload = encode_value(value, name="train.extra", allow_pickle=True)
    assert encoding == "torch_save"
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        decode_value(encoding, payload, "train.extra")


def test_nesting_too_deep_to_read_back_is_refused_at_save():
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep, (1,)]
    with pytest.raises(UnsafeCheckpointError, match="nested deeper"):
        encode_value(deep, name="deep")


def _corrupt_cases() -> dict[str, tuple[str, bytes]]:
    nest = b"\x81" * 100_000 + b"\x00"  # [[[[...]]]]: a nesting bomb
    return {
        "truncated": ("cbor", dumps([1, 2, 3])[:-1]),
        "trailing": ("cbor", dumps(1) + b"\x00"),
        "huge-array-claim": ("cbor", b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff"),
        "huge-string-claim": ("cbor", b"\x5b\x00\x00\x00\x01\x00\x00\x00\x00ab"),
        "nesting-bomb": ("cbor", nest),
        "indefinite": ("cbor", b"\x9f\x01\xff"),
        "bad-utf8": ("cbor", b"\x62\xff\xfe"),
        "unknown-tag": ("cbor", dumps(Tag(99, 1))),
        "unknown-type-name": ("cbor", dumps(Tag(27, ["os.system", "echo hi"]))),
        "bad-tuple-args": ("cbor", dumps(Tag(27, "tuple"))),
        "tensor-size-mismatch": ("cbor", dumps(Tag(27, ["torch.Tensor", "float32", [1000000], b"x"]))),
        "not-a-dtype": ("cbor", dumps(Tag(27, ["torch.dtype", "load"]))),
        "enum-outside-torch": ("cbor", dumps(Tag(27, ["enum", "os", "Enum", "X"]))),
        "numpy-object-dtype": ("cbor", dumps(Tag(27, ["numpy.ndarray", "|O", [1], b"\0" * 8]))),
        "unhashable-key": ("cbor", b"\xa1\x80\x01"),
        "json-nesting-bomb": ("json", b"[" * 200_000 + b"]" * 200_000),
        "json-huge-number": ("json", b"1" * 100_000),
        "json-nan": ("json", b"NaN"),
        "json-bad-utf8": ("json", b'"\xff"'),
        "unknown-encoding": ("pickle5", b"\x80\x05N."),
    }


@pytest.mark.parametrize("name", list(_corrupt_cases()))
def test_malformed_value_bytes_are_a_named_error(name):
    encoding, data = _corrupt_cases()[name]
    with pytest.raises(CorruptCheckpointError, match="'opt.state'"):
        decode_value(encoding, data, "opt.state")


def test_cbor_is_the_standard_encoding():
    """A few items as RFC 8949 lays them out, so any CBOR library reads them."""
    assert dumps(0) == b"\x00" and dumps(23) == b"\x17" and dumps(24) == b"\x18\x18"
    assert dumps(-1) == b"\x20" and dumps(-(2**64)) == b"\x3b" + b"\xff" * 8
    assert dumps(2**64) == b"\xc2\x49\x01" + b"\x00" * 8  # tag 2 bignum
    assert dumps(1.5) == b"\xfb\x3f\xf8\x00\x00\x00\x00\x00\x00"
    assert dumps("a") == b"\x61a" and dumps(b"a") == b"\x41a"
    assert dumps([None, True, False]) == b"\x83\xf6\xf5\xf4"
    assert dumps({"a": 1}) == b"\xa1\x61a\x01"
    assert encode_value((1, 2)) == ("cbor", b"\xd8\x1b\x83\x65tuple\x01\x02")  # tag 27
    assert loads(b"\xf9\x3c\x00") == 1.0 and loads(b"\xfa\x3f\xc0\x00\x00") == 1.5  # half, single
