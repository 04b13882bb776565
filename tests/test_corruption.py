"""Corrupted checkpoints fail loudly: checksums, truncated / missing data objects, forged
metadata.

One checkpoint is saved per module (tensors of several dtypes, two of them over 1 MiB so they
span several checksum blocks, plus non-tensor values). Every case corrupts a fresh copy and
checks that both ``dcp.load`` (UCPReader + UCPLoadPlanner) and ``open_checkpoint().read``
raise an error naming the damaged object (and, for checksum failures, the byte range), never
returning wrong values. Metadata edits are forged the way a tool could (header and index
re-signed, ``tests/support/format_v2.py``), so only the data checksums and the structural
checks can catch them; unsigned edits are refused earlier (tests/test_metadata_integrity.py).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tests.support import format_v2 as spec
from tests.support.dcp_io import load_plain as _load
from torch_ucp import (
    CorruptCheckpointError,
    UCPSavePlanner,
    UCPWriter,
    open_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MiB = 1 << 20


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "big_w": torch.randn(600, 1000, generator=g),  # 2.4 MB: 3 checksum blocks
        "ids": torch.randint(-(2**40), 2**40, (300, 1000), generator=g),  # 2.4 MB
        "emb": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "mask": torch.rand(40, generator=g) > 0.5,
    }


def _state() -> dict:
    return {"model": _model(), "step": 1234, "run_name": "corruption-run", "blob": b"\x00" * 64}


def _target() -> dict:
    return {
        "model": {k: torch.zeros_like(v) for k, v in _model().items()},
        "step": 0,
        "run_name": "",
        "blob": b"",
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corruption") / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one data object per item (threads >= items), so each corruption hits one tensor
        dcp.save(_state(), storage_writer=UCPWriter(path, threads=16), planner=UCPSavePlanner(),
                 no_dist=True)
    assert len(_stored(path, "model.big_w")["checksums"]) >= 3  # several checksum blocks
    # the corrupted large tensors each own their data object, so the first error is theirs
    ckpt = open_checkpoint(path)
    objects = {fqn: _stored(path, fqn)["object"] for fqn in ckpt.keys()}
    for fqn in ("model.big_w", "model.ids"):
        assert list(objects.values()).count(objects[fqn]) == 1, objects
    return path


def _stored(path: str, fqn: str) -> dict:
    """Where ``fqn``'s (first fragment's) bytes are."""
    ckpt = open_checkpoint(path)
    data = ckpt.metadata.values[fqn].data if fqn in ckpt.metadata.values else ckpt.fragments(fqn)[0].data
    return {"object": data.object, "byte_offset": data.byte_offset, "byte_length": data.byte_length,
            "checksums": list(data.checksums)}


def _object_path(path: str, fqn: str) -> str:
    return os.path.join(path, _stored(path, fqn)["object"])


def _flip(path: str, pos: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


@dataclass
class Damage:
    """What a corruption did: the data object to name, and the absolute byte it hit."""

    object_path: str
    byte: int | None = None  # a checksum error must report a range containing it


@dataclass(frozen=True)
class Case:
    name: str
    fqn: str
    corrupt: Callable[[str], Damage]
    checksum: bool  # fails as a checksum mismatch (message carries a byte range)


def _flip_at(fqn: str, where: Callable[[int], int], mask: int = 0xFF) -> Callable[[str], Damage]:
    def corrupt(path: str) -> Damage:
        s = _stored(path, fqn)
        pos = s["byte_offset"] + where(s["byte_length"])
        obj = _object_path(path, fqn)
        _flip(obj, pos, mask)
        return Damage(obj, pos)

    return corrupt


def _truncate(fqn: str) -> Callable[[str], Damage]:
    def corrupt(path: str) -> Damage:
        s = _stored(path, fqn)
        obj = _object_path(path, fqn)
        os.truncate(obj, s["byte_offset"] + s["byte_length"] // 2)
        return Damage(obj)

    return corrupt


def _delete(fqn: str) -> Callable[[str], Damage]:
    def corrupt(path: str) -> Damage:
        obj = _object_path(path, fqn)
        os.remove(obj)
        return Damage(obj)

    return corrupt


def _forge_index(fqn: str, edit: Callable[[dict, int], None], *, data: bool = False) -> Callable[[str], Damage]:
    """Edit ``fqn``'s row in its writer's index and re-sign index and header; the error must
    name the index (or, with ``data``, the data object whose checksum now fails)."""

    def corrupt(path: str) -> Damage:
        obj = _object_path(path, fqn)
        header = spec.read_header(path)
        for rank in header["indexes"]["ranks"]:
            index = spec.read_index(path, header, rank)
            rows = np.flatnonzero(index["tensor_key"] == spec.tensor_key(fqn))
            if len(rows):
                edit(index, int(rows[0]))
                spec.write_index(path, header, index)
                spec.write_header(path, header)
                return Damage(obj if data else os.path.join(path, spec.index_name(header, rank)))
        raise AssertionError(fqn)

    return corrupt


def _forge_header(fqn: str, edit: Callable[[dict], None], damaged: Callable[[str], str]) -> Callable[[str], Damage]:
    """Edit ``fqn``'s header entry and re-sign the header; ``damaged`` names what the error
    must name."""

    def corrupt(path: str) -> Damage:
        name = damaged(path)
        header = spec.read_header(path)
        edit(header["tensors"].get(fqn) or header["values"][fqn])
        spec.write_header(path, header)
        return Damage(name)

    return corrupt


def _index_of(fqn: str) -> Callable[[str], str]:
    def name(path: str) -> str:
        header = spec.read_header(path)
        for rank in header["indexes"]["ranks"]:
            if (spec.read_index(path, header, rank)["tensor_key"] == spec.tensor_key(fqn)).any():
                return os.path.join(path, spec.index_name(header, rank))
        raise AssertionError(fqn)

    return name


def _shorter(index: dict, row: int) -> None:
    index["byte_length"][row] -= 4


def _bad_second_checksum(index: dict, row: int) -> None:
    index["checksums"][spec.checksum_slices(index)[row]][1:2] ^= 0x1


def _set(key: str, value):
    def edit(entry: dict) -> None:
        entry[key] = value(entry[key]) if callable(value) else value

    return edit


CASES = [
    Case("flip-f32-middle", "model.big_w", _flip_at("model.big_w", lambda n: n // 2), True),
    Case("flip-f32-last-byte", "model.big_w", _flip_at("model.big_w", lambda n: n - 1), True),
    Case("flip-i64-first-byte", "model.ids", _flip_at("model.ids", lambda n: 0), True),
    Case("flip-bf16", "model.emb", _flip_at("model.emb", lambda n: n // 2 + 1), True),
    Case("flip-bool", "model.mask", _flip_at("model.mask", lambda n: 3, mask=0x01), True),
    Case("flip-value-str", "run_name", _flip_at("run_name", lambda n: n // 2, mask=0x01), True),
    Case("flip-value-int", "step", _flip_at("step", lambda n: 0, mask=0x01), True),
    Case("flip-value-bytes", "blob", _flip_at("blob", lambda n: 10), True),
    Case("truncate-object", "model.big_w", _truncate("model.big_w"), False),
    Case("delete-object", "model.ids", _delete("model.ids"), False),
    Case("meta-byte-length", "model.big_w", _forge_index("model.big_w", _shorter), False),
    Case(
        "meta-dtype-wider",
        "model.big_w",
        _forge_header("model.big_w", _set("dtype", "float64"), _index_of("model.big_w")),
        False,
    ),
    Case(
        "meta-dtype-narrower",
        "model.ids",
        _forge_header("model.ids", _set("dtype", "int32"), _index_of("model.ids")),
        False,
    ),
    Case("meta-checksum", "model.big_w", _forge_index("model.big_w", _bad_second_checksum, data=True), True),
    Case(
        "meta-value-byte-length",
        "run_name",
        _forge_header("run_name", _set("byte_length", lambda n: n - 1), lambda p: _object_path(p, "run_name")),
        True,
    ),
]
IDS = [c.name for c in CASES]



@pytest.fixture
def damaged(base, tmp_path, request) -> tuple[str, Case, Damage]:
    case: Case = request.param
    path = str(tmp_path / "ckpt")
    shutil.copytree(base, path)
    return path, case, case.corrupt(path)


def _check_range(msg: str, damage: Damage) -> None:
    ranges = [(int(a), int(b)) for a, b in re.findall(r"bytes \[(\d+), (\d+)\)", msg)]
    assert ranges, msg
    if damage.byte is not None:
        assert any(a <= damage.byte < b for a, b in ranges), (damage.byte, msg)


def test_uncorrupted_copy_loads_bit_exact(base, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(base, path)
    state = _load(path, _target())
    for k, v in _model().items():
        assert torch.equal(state["model"][k], v), k
    assert (state["step"], state["run_name"], state["blob"]) == (
        1234,
        "corruption-run",
        b"\x00" * 64,
    )
    ckpt = open_checkpoint(path)
    assert torch.equal(ckpt.read("model.big_w"), _model()["big_w"])
    assert ckpt.read("run_name") == "corruption-run"


@pytest.mark.parametrize("damaged", CASES, ids=IDS, indirect=True)
def test_open_checkpoint_read_raises(damaged):
    path, case, damage = damaged
    ckpt = open_checkpoint(path)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.read(case.fqn)
    msg = str(e.value)
    assert damage.object_path in msg
    if case.checksum:
        assert "checksum mismatch" in msg
        _check_range(msg, damage)


@pytest.mark.parametrize("damaged", CASES, ids=IDS, indirect=True)
def test_dcp_load_raises(damaged):
    path, case, damage = damaged
    state = _target()
    with pytest.raises(CheckpointException) as e:
        _load(path, state)
    msg = str(e.value)
    assert "CorruptCheckpointError" in msg
    assert damage.object_path in msg
    if case.checksum:
        assert "checksum mismatch" in msg
        _check_range(msg, damage)


@pytest.mark.parametrize("damaged", CASES, ids=IDS, indirect=True)
def test_error_names_the_fqn(damaged):
    path, case, _ = damaged
    with pytest.raises(CorruptCheckpointError) as e:
        open_checkpoint(path).read(case.fqn)
    assert case.fqn in str(e.value)
    with pytest.raises(CheckpointException) as e2:
        _load(path, _target())
    assert case.fqn in str(e2.value)


@pytest.mark.parametrize(
    "damaged", [c for c in CASES if c.name == "flip-f32-middle"], ids=["flip"], indirect=True
)
def test_verify_false_loads_the_flipped_byte(damaged):
    """The checksum is what catches a flipped byte: without it the load silently succeeds."""
    path, case, damage = damaged
    saved = _model()["big_w"]
    state = _load(path, _target(), verify=False)
    got = state["model"]["big_w"]
    assert not torch.equal(got, saved)
    # exactly one element (the one holding the flipped byte) differs, bit for bit
    differs = (got.view(torch.int32) != saved.view(torch.int32)).nonzero()
    stored = _stored(path, case.fqn)
    element = (damage.byte - stored["byte_offset"]) // 4
    assert differs.tolist() == [[element // 1000, element % 1000]]
    for k, v in _model().items():
        if k != "big_w":
            assert torch.equal(state["model"][k], v), k
    unverified = open_checkpoint(path, verify=False).read(case.fqn)
    assert torch.equal(unverified, got)
    with pytest.raises(CorruptCheckpointError):
        open_checkpoint(path).read(case.fqn)


@pytest.mark.parametrize(
    "damaged", [c for c in CASES if c.name == "flip-f32-middle"], ids=["flip"], indirect=True
)
def test_default_verify_catches_flip_in_a_partial_read(damaged):
    path, case, damage = damaged
    stored = _stored(path, case.fqn)
    row = (damage.byte - stored["byte_offset"]) // 4 // 1000
    col = (damage.byte - stored["byte_offset"]) // 4 % 1000
    saved = _model()["big_w"]
    # a row far from the flipped one reads correctly
    assert torch.equal(open_checkpoint(path).read(case.fqn, 0), saved[0])
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as e:
        open_checkpoint(path).read(case.fqn, (slice(row, row + 1),))
    _check_range(str(e.value), damage)
    # ... also when only a few columns of that row are read
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        open_checkpoint(path).read(case.fqn, (slice(row, row + 1), slice(col, col + 1)))


@pytest.mark.parametrize("damaged", CASES, ids=IDS, indirect=True)
def test_no_corruption_loads_silently_with_verify(damaged):
    """Whatever the corruption, a verified load never hands back a tensor that differs."""
    path, case, _ = damaged
    state = _target()
    try:
        _load(path, state)
    except CheckpointException:
        pass
    else:  # pragma: no cover - would be a silent wrong load
        pytest.fail(f"{case.name}: load succeeded on a corrupted checkpoint")
    try:
        value = open_checkpoint(path).read(case.fqn)
    except CorruptCheckpointError:
        return
    pytest.fail(f"{case.name}: read({case.fqn!r}) returned {type(value).__name__} silently")
