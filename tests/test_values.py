"""Non-tensor values without pickle (torch_ucp.metadata.values, docs/FORMAT.md "Value encodings").

Every value ordinary training state holds round-trips with its exact type; anything else is
refused at save (naming the key, where inside the value, and the type) unless the writer opts in;
malformed bytes give a named CorruptCheckpointError with bounded work, whatever they claim.
"""

from __future__ import annotations

import collections
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.distributed.fsdp import ShardingStrategy

from torch_ucp import CorruptCheckpointError, UnsafeCheckpointError
from torch_ucp.metadata.cbor import MAX_DEPTH, Tag, dumps, loads
from torch_ucp.metadata.values import decode_value, encode_value
from torch_ucp.sizes import parse_size


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


# Generation may be slow on a loaded CI machine; the examples are few and fixed in number.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- property-based: every supported value round-trips, everything else is refused by name -----
# (hypothesis over nested values of every supported type; the cases above pin single examples)
HASHABLE_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
    | st.binary(max_size=6) | st.complex_numbers(allow_nan=False)
)
HASHABLE = st.recursive(
    HASHABLE_LEAVES, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6
)
TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if dtype is torch.bool:
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=numel, max_size=numel)))
    else:  # any bit pattern: NaNs, infinities, subnormals, negative zeros
        data = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    t = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    t = t.reshape(shape)
    if len(shape) == 2 and draw(st.booleans()):
        t = t.t().contiguous().t()  # a non-contiguous view: stored in logical order
    if dtype.is_floating_point or dtype.is_complex:
        kind = draw(st.sampled_from(["plain", "grad", "parameter"]))
        if kind == "grad":
            t = t.clone().requires_grad_(True)
        elif kind == "parameter":
            t = torch.nn.Parameter(t.clone(), requires_grad=draw(st.booleans()))
    return t


NUMPY_DTYPES = (
    hnp.boolean_dtypes() | hnp.integer_dtypes(endianness="?") | hnp.unsigned_integer_dtypes(endianness="?")
    | hnp.floating_dtypes(endianness="?") | hnp.complex_number_dtypes(endianness="?")
)
LEAVES = (
    HASHABLE_LEAVES
    | st.floats()  # NaN and infinities too
    | st.binary(max_size=8).map(bytearray)
    | st.complex_numbers()
    | st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size)
    | st.sampled_from([*TORCH_DTYPES, torch.qint8, torch.complex128])
    | st.sampled_from([torch.device(d) for d in ("cpu", "cuda:7", "meta", "mps")])
    | st.sampled_from(
        [torch.channels_last, torch.contiguous_format, torch.preserve_format, torch.channels_last_3d]
    )
    | st.sampled_from([torch.strided, torch.sparse_coo, torch.sparse_csr, torch.per_tensor_symmetric])
    | st.sampled_from(list(ShardingStrategy))
    | tensors()
    | hnp.arrays(NUMPY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    | hnp.from_dtype(np.dtype("f4")).map(np.float32)
    | NUMPY_DTYPES.flatmap(lambda d: hnp.arrays(d, ()).map(lambda a: a[()]))  # numpy scalars
)
VALUES_STRATEGY = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.dictionaries(HASHABLE, inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3).map(collections.OrderedDict)
        | st.sets(HASHABLE, max_size=4)
        | st.frozensets(HASHABLE, max_size=4)
    ),
    max_leaves=12,
)
JSON_STRATEGY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def same_value(a, b) -> bool:
    """``same`` extended to sets, complex numbers and numpy scalars (bits, not ``==``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (set, frozenset)):
        return a == b and all(any(same_value(x, y) for y in b) for x in a)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            same_value(k, j) and same_value(a[k], b[j]) for k, j in zip(a, b)
        )
    if isinstance(a, torch.Tensor) and not a.is_contiguous():
        return same(a.contiguous(), b)
    return same(a, b)


@settings(PROPERTY, max_examples=150)
@given(VALUES_STRATEGY)
def test_every_supported_value_round_trips_exactly_without_pickle(value):
    encoding, payload = encode_value(value, name="v")
    assert encoding in ("raw", "json", "cbor"), encoding
    assert encode_value(value, name="v", allow_pickle=True) == (encoding, payload)  # pickle: last resort
    assert same_value(decode_value(encoding, payload, "v"), value)


@settings(PROPERTY, max_examples=100)
@given(tensors() | hnp.arrays(NUMPY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_tensors_and_arrays_round_trip_bit_exactly(value):
    """Every dtype, any bit pattern, with requires_grad and Parameter-ness kept."""
    encoding, payload = encode_value(value, name="v")
    assert encoding == "cbor"
    got = decode_value(encoding, payload, "v")
    assert same_value(got, value)
    if isinstance(value, torch.Tensor):
        assert got.is_contiguous() and got.requires_grad == value.requires_grad


@settings(PROPERTY, max_examples=100)
@given(JSON_STRATEGY)
def test_values_json_gives_back_unchanged_are_json(value):
    encoding, payload = encode_value(value)
    assert encoding == "json"
    assert json.loads(payload) == value and same_value(decode_value("json", payload), value)


@settings(PROPERTY, max_examples=50)
@given(st.binary(max_size=64))
def test_bytes_are_stored_as_they_are(data):
    assert encode_value(data) == ("raw", data)
    assert encode_value(memoryview(data)) == ("raw", data)
    assert decode_value("raw", data) == data


UNSUPPORTED = st.sampled_from([
    Point(1), print, same, object(), collections.defaultdict(list), collections.Counter("ab"),
    np.array(["a"], dtype=object), np.datetime64("2026-01-01"), torch.zeros(2).to_sparse(), range(3),
    torch.zeros(2, device="meta"),
])


@st.composite
def nested_unsupported(draw):
    """(value, the path to the unsupported part as the error writes it, the part)."""
    bad = draw(UNSUPPORTED)
    value, path = bad, ""
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["list", "tuple", "dict"]))
        filler = draw(st.lists(JSON_STRATEGY, max_size=2))
        i = draw(st.integers(0, len(filler)))
        if kind == "dict":
            key = draw(st.text(max_size=4))
            d = {f"_{j}": x for j, x in enumerate(filler)}
            d[key] = value
            value, path = d, f"[{key!r}]{path}"
        else:
            items = [*filler[:i], value, *filler[i:]]
            value, path = (items if kind == "list" else tuple(items)), f"[{i}]{path}"
    return value, path, bad


@settings(PROPERTY, max_examples=100)
@given(nested_unsupported())
def test_unsupported_values_are_refused_naming_key_place_and_type(case):
    value, path, bad = case
    with pytest.raises(UnsafeCheckpointError) as e:
        encode_value(value, name="optim.extra")
    msg = str(e.value)
    assert "'optim.extra'" in msg and "allow_pickle=True" in msg, msg
    if path:
        assert f"(at optim.extra{path})" in msg, (msg, path)
    if isinstance(bad, torch.Tensor):
        assert "plain dense tensors only" in msg, msg
    else:
        assert type(bad).__qualname__ in msg, msg


@pytest.mark.parametrize("encoding", ["raw", "json", "cbor"])
@settings(PROPERTY, max_examples=30)
@given(data=st.binary(max_size=40))
def test_any_bytes_decode_or_fail_with_a_named_error(encoding, data):
    """Random bytes give a value or a CorruptCheckpointError naming the key, never another error."""
    try:
        decode_value(encoding, data, "opt.state")
    except CorruptCheckpointError as e:
        assert "'opt.state'" in str(e)


# -- parse_size (--max-shard-size) --------------------------------------------------------------
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10,
         "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}


@settings(PROPERTY, max_examples=200)
@given(st.integers(1, 10**6), st.sampled_from(list(UNITS)), st.sampled_from([str.upper, str.lower, str]),
       st.sampled_from(["", " "]), st.sampled_from(["", " "]))
def test_parse_size_reads_whole_sizes_in_every_unit(n, unit, case, pad, gap):
    assert parse_size(f"{pad}{n}{gap}{case(unit)}{pad}") == n * UNITS[unit]


@settings(PROPERTY, max_examples=200)
@given(st.integers(1, 10**6), st.integers(1, 3), st.sampled_from(list(UNITS)))
def test_parse_size_reads_decimal_fractions_exactly(fraction, digits, unit):
    text = f"{fraction // 10**digits}.{fraction % 10**digits:0{digits}d}{unit}"
    size = fraction * UNITS[unit] // 10**digits  # whole bytes, floored
    if size == 0:
        with pytest.raises(ValueError, match="must be positive"):
            parse_size(text)
    else:
        assert parse_size(text) == size, text


@pytest.mark.parametrize(
    "text",
    ["", "MB", "abc", "-5MB", "+5MB", "5 XB", "1e3", "5.MB", ".5MB", "0", "0MB", "0.0001KB", "5 5MB", "5MBs"],
)
def test_parse_size_refuses_what_it_does_not_document(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
