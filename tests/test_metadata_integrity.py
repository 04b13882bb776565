"""Edited, damaged or hostile metadata never loads silently wrong (issues 11 and 12).

A 4-rank checkpoint (2 x 2 mesh: Shard, Replicate, _StridedShard, a scalar, values) is saved
once; every case damages a fresh copy:

- the header or an index edited without re-signing it: refused, naming the object;
- a header and index forged consistently (re-signed, as a tool could): a gap, an overlap, a
  wrong byte length, an unknown tensor, swapped byte offsets: refused, naming the tensor;
- random single-bit flips anywhere in the header and in every index: none loads silently;
- malformed JSON (nesting bombs, huge numbers, invalid UTF-8, NaN, oversize): one named error.

Loads go through ``dcp.load`` (UCPReader + UCPLoadPlanner), ``open_checkpoint().read`` and
``verify_checkpoint`` (what ``torch-ucp verify`` runs).
"""

from __future__ import annotations

import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tests.support import format_v2 as spec
from tests.support.matrix import check_state, save_layouts, state_for
from torch_ucp import (
    CheckpointError,
    CorruptCheckpointError,
    UCPLoadPlanner,
    UCPReader,
    UnsupportedFormatError,
    open_checkpoint,
)
from torch_ucp.demo.launch import run_distributed
from torch_ucp.verify import verify_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYOUTS = ["ws4-2d", "ws4-fsdp-tp-strided", "ws4-hsdp"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("integrity"))
    run_distributed(save_layouts, 4, root, LAYOUTS, {})
    return root


@pytest.fixture
def ckpt(base, tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(base, "ws4-2d"), path)
    return path


def _load(path: str) -> list[str]:
    """Load into one plain process; the problems of the loaded state (or raise)."""
    state = state_for("ws1-plain", None, fill=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=UCPReader(path), planner=UCPLoadPlanner(), no_dist=True)
    return check_state(state)


def _read_all(path: str) -> None:
    ckpt = open_checkpoint(path)
    for fqn in ckpt.keys():
        ckpt.read(fqn)


def _refused(path: str, *names: str) -> None:
    """Every entry point refuses ``path`` with an error naming each of ``names``."""
    with pytest.raises(CheckpointException) as e:
        _load(path)
    for name in names:
        assert name in str(e.value), (name, str(e.value)[-600:])
    with pytest.raises(CheckpointError) as e2:
        _read_all(path)
    for name in names:
        assert name in str(e2.value), (name, str(e2.value))
    report = verify_checkpoint(path)
    assert not report.ok
    assert any(all(n in p for n in names) for p in report.problems), report.problems


def test_undamaged_copy_loads_and_verifies(ckpt):
    assert _load(ckpt) == []
    assert verify_checkpoint(ckpt).ok
    _read_all(ckpt)


# -- edits without re-signing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda h: h["tensors"]["model.w_even"].__setitem__("dtype", "int32"), id="dtype-f32-to-i32"),
        pytest.param(lambda h: h["tensors"]["model.emb"].__setitem__("dtype", "float16"), id="dtype-bf16-to-f16"),
        pytest.param(lambda h: h["tensors"]["model.ids"].__setitem__("dtype", "float64"), id="dtype-i64-to-f64"),
        pytest.param(lambda h: h["tensors"]["model.mask"].__setitem__("dtype", "uint8"), id="dtype-bool-to-u8"),
        pytest.param(lambda h: h["tensors"]["model.w_odd"].__setitem__("shape", [7, 13]), id="shape"),
        pytest.param(lambda h: h["values"]["extra.step"].__setitem__("byte_offset", 0), id="value-offset"),
        pytest.param(lambda h: h["indexes"]["crc32c"].__setitem__(1, 12345), id="index-crc"),
        pytest.param(lambda h: h["tensors"].pop("model.vec"), id="tensor-removed"),
    ],
)
def test_unsigned_header_edit_is_refused(ckpt, edit):
    header = spec.read_header(ckpt)
    edit(header)
    spec.write_header(ckpt, header, sign=False)
    _refused(ckpt, ".metadata", "corrupt")


def _index_edit(ckpt: str, rank: int, edit) -> str:
    header = spec.read_header(ckpt)
    index = spec.read_index(ckpt, header, rank)
    edit(index)
    before = list(header["indexes"]["crc32c"]), list(header["indexes"]["bytes"])
    spec.write_index(ckpt, header, index)  # the header is not updated: the index is edited
    header["indexes"]["crc32c"], header["indexes"]["bytes"] = before
    return spec.index_name(header, rank)


def _swap_offsets(index: dict) -> None:
    index["byte_offset"][[0, 1]] = index["byte_offset"][[1, 0]]


def _shrink(index: dict) -> None:
    index["lengths"][0, 0] -= 1


@pytest.mark.parametrize("edit", [_swap_offsets, _shrink], ids=["swap-offsets", "shrink-fragment"])
def test_unsigned_index_edit_is_refused(ckpt, edit):
    name = _index_edit(ckpt, 1, edit)
    _refused(ckpt, name)


def test_truncated_missing_and_padded_indexes_are_refused(ckpt, tmp_path):
    header = spec.read_header(ckpt)
    name = spec.index_name(header, 2)
    path = os.path.join(ckpt, name)
    blob = open(path, "rb").read()
    for damage in ("truncate", "pad", "delete"):
        if damage == "truncate":
            open(path, "wb").write(blob[:-9])
        elif damage == "pad":
            open(path, "wb").write(blob + b"\0" * 8)
        else:
            os.remove(path)
        _refused(ckpt, name)
        open(path, "wb").write(blob)


# -- forged, consistent edits (re-signed) -----------------------------------------------------


def _forge(ckpt: str, rank: int, edit) -> None:
    header = spec.read_header(ckpt)
    index = edit(spec.read_index(ckpt, header, rank), header)
    spec.write_index(ckpt, header, index)
    spec.write_header(ckpt, header)


def _row_of(index: dict, fqn: str) -> int:
    return int(np.flatnonzero(index["tensor_key"] == spec.tensor_key(fqn))[0])


def test_forged_gap_is_refused_naming_the_tensor(ckpt):
    def drop(index, header):
        header["tensors"]["model.w_even"]["fragments"] -= 1
        return spec.drop_row(index, _row_of(index, "model.w_even"))

    _forge(ckpt, 3, drop)
    _refused(ckpt, "'model.w_even'")


def test_forged_overlap_is_refused_naming_the_tensor(ckpt):
    def grow(index, header):
        row = _row_of(index, "model.w_even")
        index["offsets"][row, 0] -= 1  # now overlaps the fragment above it by a row
        index["lengths"][row, 0] += 1
        return index

    _forge(ckpt, 3, grow)
    _refused(ckpt, "'model.w_even'")


def test_forged_byte_length_and_unknown_tensor_are_refused(ckpt):
    def lie(index, header):
        index["byte_length"][_row_of(index, "model.ids")] += 8
        return index

    _forge(ckpt, 0, lie)
    _refused(ckpt, "model.ids", "does not fit")


def test_forged_index_naming_an_unknown_tensor_is_refused(ckpt):
    def rename(index, header):
        index["tensor_key"][0] = spec.tensor_key("no.such.tensor")
        return index

    _forge(ckpt, 1, rename)
    _refused(ckpt, "names a tensor the header does not list")


def test_forged_byte_offset_fails_the_data_checksums(ckpt):
    def point_elsewhere(index, header):
        order = np.argsort(index["byte_length"])
        a, b = int(order[-2]), int(order[-1])  # a reads the start of b's (larger) bytes
        index["byte_offset"][a] = index["byte_offset"][b]
        return index

    _forge(ckpt, 0, point_elsewhere)
    _refused(ckpt, "checksum mismatch")


# -- random bit flips -----------------------------------------------------------------------------


def test_random_bit_flips_in_metadata_never_load_silently(base, tmp_path):
    """A few hundred single-bit flips over the header and every index of three layouts:
    each is detected (an error) or harmless (bit-exact); none loads wrong values."""
    rng = random.Random(11)
    tried = detected = 0
    for layout in LAYOUTS:
        src = os.path.join(base, layout)
        header = spec.read_header(src)
        files = [".metadata", *(spec.index_name(header, r) for r in header["indexes"]["ranks"])]
        for _ in range(40):
            target = rng.choice(files)
            path = str(tmp_path / f"flip-{tried}")
            shutil.copytree(src, path)
            f = os.path.join(path, target)
            data = bytearray(open(f, "rb").read())
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            open(f, "wb").write(bytes(data))
            tried += 1
            try:
                problems = _load(path)
            except CheckpointException as e:
                assert "Error" in str(e)
                detected += 1
            else:
                pytest.fail(f"{layout}: flip of bit {bit} in {target} loaded ({problems or 'identical'})")
            shutil.rmtree(path)
    assert (tried, detected) == (120, 120)


# -- malformed JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b'{"format":"torch_ucp","version":2,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"format":"torch_ucp","version":' + b"9" * 100_000 + b"}", "digits"),
        (b'{"format":"torch_ucp","version":2,"save_id":"\xff\xfe"}', "not valid UTF-8"),
        (b'{"format":"torch_ucp","version":2,"created":NaN}', "NaN is not JSON"),
        (b'{"format":"torch_ucp","version":2,"created":1e999}', "overflows"),
    ],
    ids=["nesting-bomb", "huge-int", "utf8", "nan", "inf"],
)
def test_malformed_json_is_one_named_error(ckpt, payload, expected):
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(payload)
    with pytest.raises(UnsupportedFormatError, match=expected) as e:
        open_checkpoint(ckpt)
    assert os.path.join(ckpt, ".metadata") in str(e.value)
    report = verify_checkpoint(ckpt)
    assert not report.ok and expected.split()[0] in report.problems[0]


def test_oversized_header_is_refused_before_parsing(ckpt, monkeypatch):
    monkeypatch.setenv("TORCH_UCP_MAX_METADATA_BYTES", "1000")
    with pytest.raises(CorruptCheckpointError, match="more than the 1000 allowed") as e:
        open_checkpoint(ckpt)
    assert "TORCH_UCP_MAX_METADATA_BYTES" in str(e.value)


# -- version 1 -----------------------------------------------------------------------------------

V1 = os.path.join(os.path.dirname(__file__), "fixtures", "v1")


def test_version1_gap_is_refused(tmp_path):
    import json

    path = str(tmp_path / "v1")
    shutil.copytree(os.path.join(V1, "ws4-2d" if os.path.isdir(os.path.join(V1, "ws4-2d")) else "ws4-hsdp"), path)
    meta = json.load(open(os.path.join(path, ".metadata")))
    frags = meta["tensors"]["model.w_even"]["fragments"]
    frags.pop(0)
    json.dump(meta, open(os.path.join(path, ".metadata"), "w"))
    with pytest.raises(CorruptCheckpointError, match="'model.w_even'.*do not tile"):
        open_checkpoint(path).read("model.w_even")
    with pytest.raises(CheckpointException, match="do not tile"):
        _load(path)
    assert not verify_checkpoint(path).ok
    torch.manual_seed(0)
