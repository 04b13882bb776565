"""The on-disk format: plain JSON metadata, raw little-endian data objects, version checks.

Single process, local disk. Every tensor comparison is bit-exact.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from torch_ucp import (
    CheckpointNotFoundError,
    UCPLoadPlanner,
    UCPReader,
    UCPSavePlanner,
    UCPWriter,
    UnsupportedFormatError,
    open_checkpoint,
)
from torch_ucp.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    CheckpointMetadata,
    Fragment,
    MeshInfo,
    ObjectEntry,
    PlacementInfo,
    StoredBytes,
    TensorEntry,
    decode_metadata,
    encode_metadata,
)
from torch_ucp.storage.checksum import BlockGrid

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


# -- codec -------------------------------------------------------------------------------------


def test_codec_round_trip_of_saved_metadata(ckpt):
    raw = _read_metadata_bytes(ckpt)
    meta = decode_metadata(raw, "test")
    again = decode_metadata(encode_metadata(meta), "test")
    assert again == meta
    # field by field, so a failure says which one broke
    for field in (
        "save_id",
        "world_size",
        "meshes",
        "flatten_mapping",
        "checksum_algorithm",
        "checksum_block_bytes",
        "patterns",
        "torch_version",
        "created",
        "version",
    ):
        assert getattr(again, field) == getattr(meta, field), field
    assert list(again.tensors) == list(meta.tensors)
    for fqn, t in meta.tensors.items():
        u = again.tensors[fqn]
        assert (u.fqn, u.dtype, u.shape, u.mesh, u.placements) == (
            t.fqn,
            t.dtype,
            t.shape,
            t.mesh,
            t.placements,
        )
        assert u.fragments == t.fragments
    assert again.objects == meta.objects
    # the writer used the same codec: re-encoding is byte-identical
    assert encode_metadata(meta) == raw


def test_saved_metadata_describes_the_state(ckpt):
    meta = decode_metadata(_read_metadata_bytes(ckpt))
    tensors = _tensors()
    assert meta.version == FORMAT_VERSION
    assert meta.world_size == 1
    assert meta.torch_version == torch.__version__
    assert set(meta.tensors) == set(tensors)
    assert set(meta.objects) == {"step", "name", "blob", "cfg.lr", "cfg.betas"}
    assert meta.flatten_mapping["cfg.betas"] == ["cfg", "betas"]
    for fqn, t in tensors.items():
        entry = meta.tensors[fqn]
        assert entry.dtype == t.dtype
        assert entry.shape == tuple(t.shape)
        assert entry.mesh is None and entry.placements is None
        (frag,) = entry.fragments
        assert frag.offsets == (0,) * t.dim()
        assert frag.lengths == tuple(t.shape)
        assert frag.data.byte_length == t.numel() * t.element_size()
        assert frag.data.object.startswith(f"data-{meta.save_id}/")
        grid = BlockGrid.for_fragment(
            frag.lengths, t.element_size(), meta.checksum_block_bytes, meta.checksum_block_width
        )
        assert len(frag.data.checksums) == grid.count >= 1
    assert meta.objects["blob"].encoding == "raw"
    assert meta.objects["step"].encoding == "json"


def test_codec_round_trip_with_every_optional_field():
    meta = CheckpointMetadata(
        save_id="20250101T000000-abcdef01",
        world_size=4,
        tensors={
            "w": TensorEntry(
                fqn="w",
                dtype=torch.bfloat16,
                shape=(8, 6),
                fragments=[
                    Fragment(
                        offsets=(0, 0),
                        lengths=(4, 6),
                        data=StoredBytes("data-x/00000-0.bin", 0, 48, (1, 2)),
                        rank=0,
                        coordinate=(0, 0),
                    ),
                    Fragment(
                        offsets=(4, 0),
                        lengths=(4, 6),
                        data=StoredBytes("data-x/00002-0.bin", 16, 48, (3,)),
                        rank=2,
                        coordinate=(1, 0),
                    ),
                ],
                mesh=0,
                placements=(
                    PlacementInfo("strided_shard", 0, 2),
                    PlacementInfo("shard", 0),
                ),
            ),
            "r": TensorEntry(
                fqn="r",
                dtype=torch.int32,
                shape=(),
                fragments=[Fragment((), (), StoredBytes("data-x/00000-0.bin", 48, 4, (9,)), 0)],
                mesh=1,
                placements=(PlacementInfo("replicate"),),
            ),
        },
        objects={
            "step": ObjectEntry("step", "json", StoredBytes("data-x/00000-0.bin", 52, 2, (7,)), 0)
        },
        meshes=[MeshInfo((2, 2), ("dp", "tp")), MeshInfo((4,), None)],
        flatten_mapping={"w": ["w"], "r": ["r"], "step": ["step"]},
        checksum_algorithm="crc32",
        checksum_block_bytes=4096,
        patterns=[{"kind": "rename", "from": "a", "to": "b"}],
        torch_version="2.13.0",
        created=1700000000.5,
    )
    encoded = encode_metadata(meta)
    assert json.loads(encoded)["data_objects"] == ["data-x/00000-0.bin", "data-x/00002-0.bin"]
    assert decode_metadata(encoded) == meta


# -- plain JSON, raw bytes -----------------------------------------------------------------------


def test_metadata_is_plain_json_not_pickle(ckpt):
    raw = _read_metadata_bytes(ckpt)
    assert raw[:1] == b"{"
    d = json.loads(raw)
    assert d["format"] == "torch_ucp"
    assert d["version"] == FORMAT_VERSION
    assert set(d["tensors"]) == set(_tensors())
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


def test_checkpoint_folder_has_metadata_file(ckpt):
    # TorchTitan finds checkpoints with exactly this test
    assert os.path.isfile(os.path.join(ckpt, ".metadata"))
    entries = sorted(os.listdir(ckpt))
    save_id = json.loads(_read_metadata_bytes(ckpt))["save_id"]
    assert entries == [".metadata", f"data-{save_id}"]


@pytest.mark.parametrize("fqn", ["f32", "bf16", "i64", "mask", "f32_t", "scalar"])
def test_data_objects_hold_raw_c_contiguous_little_endian_bytes(ckpt, fqn):
    d = json.loads(_read_metadata_bytes(ckpt))
    (frag,) = d["tensors"][fqn]["fragments"]
    path = os.path.join(ckpt, d["data_objects"][frag["object"]])
    with open(path, "rb") as f:
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
    d = json.loads(_read_metadata_bytes(ckpt))
    entry = d["objects"]["blob"]
    with open(os.path.join(ckpt, d["data_objects"][entry["object"]]), "rb") as f:
        f.seek(entry["byte_offset"])
        assert f.read(entry["byte_length"]) == b"\x00\x01\xfe\xffraw"
    entry = d["objects"]["cfg.betas"]
    with open(os.path.join(ckpt, d["data_objects"][entry["object"]]), "rb") as f:
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
    d = json.loads(_read_metadata_bytes(path))
    d["version"] = 99
    _write_metadata(path, json.dumps(d).encode())
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
    # FORMAT.md: stock FileSystemReader.read_metadata() unpickles `.metadata` and fails with
    # pickle.UnpicklingError ("invalid load key, '{'") on a torch_ucp checkpoint.
    with pytest.raises(pickle.UnpicklingError, match="invalid load key"):
        dcp.FileSystemReader(ckpt).read_metadata()


def _mutate(path: str, edit) -> None:
    d = json.loads(_read_metadata_bytes(path))
    edit(d)
    _write_metadata(path, json.dumps(d).encode())


def _first_fragment(d: dict) -> dict:
    return d["tensors"]["f32"]["fragments"][0]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: _first_fragment(d).__setitem__("object", 99), id="object-index"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("dtype", "float128"), id="dtype"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("shape", None), id="shape-none"),
        pytest.param(lambda d: d["tensors"]["f32"].__setitem__("fragments", "x"), id="fragments"),
        pytest.param(lambda d: d.__setitem__("checksum", None), id="checksum"),
        pytest.param(lambda d: d.__setitem__("version", 1.0), id="version-float"),
        pytest.param(lambda d: d.pop("save_id"), id="no-save-id"),
        pytest.param(
            lambda d: d.__setitem__("tensors", []),
            id="tensors-list",
        ),
        pytest.param(
            lambda d: d.__setitem__("objects", []),
            id="objects-list",
        ),
        pytest.param(
            lambda d: d.__setitem__("version", True),
            id="version-true",
        ),
    ],
)
def test_malformed_metadata_is_unsupported_format(ckpt_copy, edit):
    _mutate(ckpt_copy, edit)
    with pytest.raises(UnsupportedFormatError) as e:
        open_checkpoint(ckpt_copy)
    assert os.path.join(ckpt_copy, METADATA_FILE) in str(e.value)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "data-x/../../y.bin", "a//b"])
def test_data_object_names_must_stay_inside_the_checkpoint(tmp_path, name):
    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3)}, storage_writer=UCPWriter(str(path)), planner=UCPSavePlanner(),
             no_dist=True)
    meta = json.loads((path / ".metadata").read_text())
    meta["data_objects"][0] = name
    (path / ".metadata").write_text(json.dumps(meta))
    with pytest.raises(UnsupportedFormatError, match="not a relative path inside the checkpoint"):
        open_checkpoint(str(path))
