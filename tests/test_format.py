"""The on-disk format, version 2, checked against docs/FORMAT.md by an independent reader
(``tests/support/format_v2.py``): a self-checksummed JSON header, one binary fragment index per
writer rank, raw little-endian data objects; version checks and malformed headers.

Single process, local disk. Every tensor comparison is bit-exact.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings

import crc32c
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tests.support import format_v2 as spec
from torch_ucp import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    UnsupportedFormatError,
    open_checkpoint,
)
from torch_ucp.metadata import FORMAT_VERSION, METADATA_FILE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "f32": torch.randn(37, 29, generator=g),
        "bf16": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (5, 7, 3), generator=g),
        "mask": torch.rand(33, generator=g) > 0.5,
        # a non-contiguous view must still land C-contiguous on disk
        "f32_t": torch.randn(6, 10, generator=g).t(),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
    }


def _state() -> dict:
    return {
        **_tensors(),
        "step": 42,
        "name": "run-α",
        "blob": b"\x00\x01\xfe\xffraw",
        "cfg": {"lr": 0.5, "betas": [0.9, 0.95]},
    }


def _save(path: str, state: dict | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            _state() if state is None else state,
            storage_writer=UCPWriter(path),
            planner=UCPSavePlanner(),
            no_dist=True,
        )
    return path


def _target() -> dict:
    return {
        **{k: torch.zeros_like(v) for k, v in _tensors().items()},
        "step": 0,
        "name": "",
        "blob": b"",
        "cfg": {"lr": 0.0, "betas": [0.0, 0.0]},
    }


def _load(path: str, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=UCPReader(path), planner=UCPLoadPlanner(), no_dist=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return _save(str(tmp_path_factory.mktemp("format") / "ckpt"))


@pytest.fixture
def ckpt_copy(ckpt, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(ckpt, dst)
    return dst


def _read_metadata_bytes(path: str) -> bytes:
    with open(os.path.join(path, METADATA_FILE), "rb") as f:
        return f.read()


# -- what is on disk ----------------------------------------------------------------------------


def _fragments(path: str) -> dict[str, list[dict]]:
    """Every fragment row, per tensor, decoded by the independent reader."""
    header = spec.read_header(path)
    by_key = {spec.tensor_key(fqn): fqn for fqn in header["tensors"]}
    out: dict[str, list[dict]] = {fqn: [] for fqn in header["tensors"]}
    for rank in header["indexes"]["ranks"]:
        index = spec.read_index(path, header, rank)
        for i, span in enumerate(spec.checksum_slices(index)):
            fqn = by_key[int(index["tensor_key"][i])]
            ndim = len(header["tensors"][fqn]["shape"])
            out[fqn].append({
                "object": index["names"][int(index["object"][i])],
                "byte_offset": int(index["byte_offset"][i]),
                "byte_length": int(index["byte_length"][i]),
                "offsets": index["offsets"][i, :ndim].tolist(),
                "lengths": index["lengths"][i, :ndim].tolist(),
                "checksums": index["checksums"][span].tolist(),
                "rank": rank,
            })
    return out


def test_header_is_self_checksummed_json_not_pickle(ckpt):
    raw = _read_metadata_bytes(ckpt)
    assert raw.startswith(b'{"header_crc32c":"') and raw[26:28] == b'",'
    assert int(raw[18:26], 16) == crc32c.crc32c(raw[28:])
    d = json.loads(raw)
    assert (d["format"], d["version"]) == ("torch_ucp", FORMAT_VERSION) == ("torch_ucp", 2)
    assert set(d["tensors"]) == set(_tensors())
    f32 = _tensors()["f32"]
    assert d["tensors"]["f32"] == {
        "dtype": "float32", "shape": [37, 29], "fragments": 1, "writers": [0],
        "content_hash": spec.content_hash(f32.numpy().tobytes(), 4),
    }
    assert d["content_hash"] == {"algorithm": "mlh64"}
    for name, t in _tensors().items():  # the FORMAT.md definition, computed independently
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert d["tensors"][name]["content_hash"] == spec.content_hash(raw, t.dtype.itemsize), name
    assert d["checksum"] == {"algorithm": "crc32c", "block_bytes": 65536, "block_width": 2048}
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


def test_independent_reader_agrees_with_torch_ucp(ckpt):
    on_disk = _fragments(ckpt)
    ckpt_ = open_checkpoint(ckpt)
    for fqn in _tensors():
        got = [(f.data.object, f.data.byte_offset, f.data.byte_length, list(f.offsets), list(f.lengths),
                list(f.data.checksums), f.rank) for f in ckpt_.fragments(fqn)]
        want = [(r["object"], r["byte_offset"], r["byte_length"], r["offsets"], r["lengths"],
                 r["checksums"], r["rank"]) for r in on_disk[fqn]]
        assert got == want, fqn
        for frag in on_disk[fqn]:  # block checksums of the stored bytes, as specified
            with open(os.path.join(ckpt, frag["object"]), "rb") as f:
                f.seek(frag["byte_offset"])
                data = f.read(frag["byte_length"])
            header = spec.read_header(ckpt)
            itemsize = _tensors()[fqn].element_size()
            assert frag["checksums"] == spec.block_checksums(data, frag["lengths"], itemsize, header)
            assert frag["byte_offset"] % 64 == 0


def test_checkpoint_folder_layout(ckpt):
    # TorchTitan finds checkpoints by a step folder's .metadata
    assert os.path.isfile(os.path.join(ckpt, ".metadata"))
    save_id = spec.read_header(ckpt)["save_id"]
    assert sorted(os.listdir(ckpt)) == [".metadata", f"data-{save_id}"]
    data = sorted(os.listdir(os.path.join(ckpt, f"data-{save_id}")))
    assert "00000.idx" in data and ".torch_ucp_save" in data, data  # index, save marker
    assert all(re.fullmatch(r"00000(-\d+\.bin|\.idx)|\.torch_ucp_save", n) for n in data), data


@pytest.mark.parametrize("fqn", ["f32", "bf16", "i64", "mask", "f32_t", "scalar"])
def test_data_objects_hold_raw_c_contiguous_little_endian_bytes(ckpt, fqn):
    (frag,) = _fragments(ckpt)[fqn]
    with open(os.path.join(ckpt, frag["object"]), "rb") as f:
        f.seek(frag["byte_offset"])
        data = f.read(frag["byte_length"])
    saved = _tensors()[fqn]
    assert len(data) == saved.numel() * saved.element_size()
    got = torch.frombuffer(bytearray(data), dtype=saved.dtype).reshape(saved.shape)
    assert got.dtype == saved.dtype
    assert torch.equal(got, saved)
    # explicitly little-endian, independent of the host: decode with numpy's '<' types
    if saved.dtype == torch.bfloat16:
        # bfloat16 is the high half of a float32: widen the little-endian u16 and reinterpret
        widened = (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
        assert np.array_equal(widened.reshape(saved.shape), saved.float().numpy())
    else:
        le = {torch.float32: "<f4", torch.float64: "<f8", torch.int64: "<i8", torch.bool: "|b1"}
        decoded = np.frombuffer(data, le[saved.dtype]).reshape(saved.shape)
        assert np.array_equal(decoded, saved.contiguous().numpy())


def test_raw_bytes_value_stored_verbatim(ckpt):
    values = spec.read_header(ckpt)["values"]
    entry = values["blob"]
    with open(os.path.join(ckpt, entry["object"]), "rb") as f:
        f.seek(entry["byte_offset"])
        assert f.read(entry["byte_length"]) == b"\x00\x01\xfe\xffraw"
    entry = values["cfg.betas"]
    with open(os.path.join(ckpt, entry["object"]), "rb") as f:
        f.seek(entry["byte_offset"])
        assert json.loads(f.read(entry["byte_length"])) == [0.9, 0.95]


def test_saved_checkpoint_loads_back_bit_exact(ckpt):
    state = _target()
    _load(ckpt, state)
    for fqn, t in _tensors().items():
        assert torch.equal(state[fqn], t), fqn
    assert state["step"] == 42 and state["name"] == "run-α"
    assert state["blob"] == b"\x00\x01\xfe\xffraw"
    assert state["cfg"] == {"lr": 0.5, "betas": [0.9, 0.95]}


# -- version and format errors --------------------------------------------------------------


def _write_metadata(path: str, data: bytes) -> None:
    with open(os.path.join(path, METADATA_FILE), "wb") as f:
        f.write(data)


def _future_version(path: str) -> str:
    d = spec.read_header(path)
    d["version"] = 99
    spec.write_header(path, d)
    return os.path.join(path, METADATA_FILE)


def test_future_version_open_checkpoint(ckpt_copy):
    meta_file = _future_version(ckpt_copy)
    with pytest.raises(UnsupportedFormatError) as e:
        open_checkpoint(ckpt_copy)
    msg = str(e.value)
    assert meta_file in msg
    assert "version 99" in msg
    assert f"1..{FORMAT_VERSION}" in msg


def test_future_version_dcp_load(ckpt_copy):
    meta_file = _future_version(ckpt_copy)
    state = _target()
    with pytest.raises(CheckpointException) as e:
        _load(ckpt_copy, state)
    # DCP re-raises metadata failures as an AssertionError carrying only the message
    msg = str(e.value)
    assert meta_file in msg
    assert "version 99" in msg
    assert f"1..{FORMAT_VERSION}" in msg
    assert all(torch.count_nonzero(state[k]) == 0 for k in _tensors())


def test_stock_pickled_metadata_is_rejected_with_hint(tmp_path):
    path = str(tmp_path / "stock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.randn(3, 4)}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    assert _read_metadata_bytes(path)[:1] == b"\x80"  # a pickle, protocol >= 2
    with pytest.raises(UnsupportedFormatError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert os.path.join(path, METADATA_FILE) in msg
    assert "stock torch.distributed.checkpoint" in msg
    with pytest.raises(CheckpointException, match="stock torch.distributed.checkpoint"):
        _load(path, {"w": torch.zeros(3, 4)})


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"not json at all", "is not JSON torch_ucp metadata"),
        (b'{"format": "torch_ucp", ', "not valid JSON"),
        (b'{"format": "something-else", "version": 1}', "is not torch_ucp checkpoint metadata"),
        (b'{"format": "torch_ucp", "version": 1}', "malformed torch_ucp metadata"),
        (b'{"format": "torch_ucp", "version": 0}', "format version 0"),
    ],
)
def test_non_ucp_metadata_is_rejected(ckpt_copy, payload, expected):
    _write_metadata(ckpt_copy, payload)
    with pytest.raises(UnsupportedFormatError, match=re.escape(expected)) as e:
        open_checkpoint(ckpt_copy)
    assert os.path.join(ckpt_copy, METADATA_FILE) in str(e.value)


def test_missing_metadata_is_not_found(ckpt_copy, tmp_path):
    os.remove(os.path.join(ckpt_copy, METADATA_FILE))
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(ckpt_copy)
    assert ckpt_copy in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    nowhere = str(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointNotFoundError, match=re.escape(nowhere)):
        open_checkpoint(nowhere)
    with pytest.raises(CheckpointException, match="no committed checkpoint at") as e:
        _load(ckpt_copy, _target())
    assert ckpt_copy in str(e.value)


def test_stock_filesystem_reader_cannot_read_ucp_metadata(ckpt):
    # FORMAT.md: stock FileSystemReader.read_metadata() unpickles `.metadata` and fails on a
    # torch_ucp checkpoint; with torch_ucp imported the error (still an UnpicklingError) says
    # what the checkpoint is and what to call instead.
    with pytest.raises(pickle.UnpicklingError, match="is a torch_ucp checkpoint") as e:
        dcp.FileSystemReader(ckpt).read_metadata()
    assert "invalid load key" in str(e.value.__cause__)


def _mutate(path: str, edit) -> None:
    """Edit the header and re-sign it: only its structure can catch the edit."""
    d = spec.read_header(path)
    edit(d)
    spec.write_header(path, d)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("dtype", "float128"), id="dtype"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("shape", None), id="shape-none"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("shape", [-1, 29]), id="shape-negative"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("fragments", "x"), id="fragments"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("writers", [7]), id="writer-not-a-rank"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("mesh", 0), id="mesh-without-meshes"),
        pytest.param(lambda d: d.__setitem__("checksum", None), id="checksum"),
        pytest.param(lambda d: d.__setitem__("version", 1.0), id="version-float"),
        pytest.param(lambda d: d.pop("save_id"), id="no-save-id"),
        pytest.param(lambda d: d.__setitem__("save_id", "../x"), id="save-id-path"),
        pytest.param(lambda d: d.__setitem__("tensors", []), id="tensors-list"),
        pytest.param(lambda d: d.__setitem__("values", []), id="values-list"),
        pytest.param(lambda d: d["indexes"]["bytes"].append(3), id="indexes-ragged"),
        pytest.param(lambda d: d["values"]["step"].__setitem__("object", "/etc/passwd"), id="value-object"),
        pytest.param(lambda d: d.__setitem__("version", True), id="version-true"),
    ],
)
def test_malformed_metadata_is_unsupported_format(ckpt_copy, edit):
    _mutate(ckpt_copy, edit)
    with pytest.raises(UnsupportedFormatError) as e:
        open_checkpoint(ckpt_copy)
    assert os.path.join(ckpt_copy, METADATA_FILE) in str(e.value)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "data-x/../../y.bin", "a//b"])
def test_data_object_names_must_stay_inside_the_checkpoint(ckpt_copy, name):
    header = spec.read_header(ckpt_copy)
    index = spec.read_index(ckpt_copy, header, 0)
    index["names"][0] = name
    spec.write_index(ckpt_copy, header, index)
    spec.write_header(ckpt_copy, header)
    with pytest.raises(CorruptCheckpointError, match="not a relative path inside the checkpoint") as e:
        open_checkpoint(ckpt_copy).read("f32")
    assert "00000.idx" in str(e.value)
