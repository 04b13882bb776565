"""``open_checkpoint``: inspect and read checkpoints (whole, sliced, values) with no process group."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torch_ucp import UCPSavePlanner, UCPWriter, open_checkpoint
from torch_ucp.demo.launch import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MiB = 1 << 20


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {
        "model.w": torch.randn(13, 7, generator=g),
        "model.big": torch.randn(256, 1024, generator=g),  # 1 MiB: a whole checksum block
        "model.cube": torch.randint(-1000, 1000, (4, 5, 6), generator=g),
        "model.emb": torch.randn(10, 6, generator=g).to(torch.bfloat16),
        "model.vec": torch.randn(11, generator=g).double(),
        "model.mask": torch.rand(6, 4, generator=g) > 0.5,
        "model.scalar": torch.tensor(2.5),
    }


VALUES = {
    "step": 17,
    "name": "llama-debug",
    "blob": b"\x00\xffbytes\x10",
    "schedule": [1, 2.5, "three", None, True],
    "config": {"opt": {"lr": 0.001, "betas": [0.9, 0.95]}, "name": "adamw", "n": None},
}


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("open") / "ckpt")
    state = {**_tensors(), **VALUES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # flatten_state_dict=False keeps nested dict/list values whole (one key each)
        dcp.save(
            state,
            storage_writer=UCPWriter(path),
            planner=UCPSavePlanner(flatten_state_dict=False),
            no_dist=True,
        )
    return path


@pytest.fixture
def ckpt(ckpt_path):
    return open_checkpoint(ckpt_path)


def test_keys_shapes_dtypes(ckpt, ckpt_path):
    tensors = _tensors()
    assert sorted(ckpt.keys()) == sorted([*tensors, *VALUES])
    assert sorted(ckpt) == sorted(ckpt.keys())
    assert len(ckpt) == len(tensors) + len(VALUES)
    for fqn, t in tensors.items():
        assert fqn in ckpt
        assert ckpt.shape(fqn) == t.shape
        assert isinstance(ckpt.shape(fqn), torch.Size)
        assert ckpt.dtype(fqn) == t.dtype
    for fqn in VALUES:
        assert fqn in ckpt
    assert "model.nope" not in ckpt
    assert 3 not in ckpt
    assert ckpt.url == ckpt_path
    assert ckpt_path in repr(ckpt)


@pytest.mark.parametrize("fqn", sorted(_tensors()))
def test_read_whole_tensor(ckpt, fqn):
    saved = _tensors()[fqn]
    got = ckpt.read(fqn)
    assert got.dtype == saved.dtype and got.shape == saved.shape
    assert torch.equal(got, saved)


INDICES = {
    "model.w": [
        0,
        12,
        -1,
        -13,
        slice(2, 9),
        slice(-4, None),
        slice(None, -3),
        slice(5, 100),
        slice(5, 5),
        slice(-100, 2),
        (3, 4),
        (-1, -7),
        (slice(1, 4), 2),
        (2, slice(1, 6)),
        (slice(3, 8), slice(-5, -1)),
        (slice(None), slice(6, 7)),
        [slice(1, 3), -2],
    ],
    "model.big": [0, 255, -1, slice(100, 101), (slice(10, 200), slice(500, 700))],
    "model.cube": [
        (1, slice(1, 4), -1),
        (slice(None), 2),
        (slice(1, 3), slice(None), slice(2, 5)),
        (-1, -1, -1),
        (0, 0),
    ],
    "model.emb": [(slice(2, 7), slice(1, 5)), -3],
    "model.vec": [4, slice(3, -3), -11],
    "model.mask": [(slice(1, 5), 3), 2],
}
INDEX_CASES = [(fqn, idx) for fqn, idxs in INDICES.items() for idx in idxs]


@pytest.mark.parametrize("fqn, index", INDEX_CASES, ids=[f"{f}-{i!r}" for f, i in INDEX_CASES])
def test_read_index_equals_saved_index(ckpt, fqn, index):
    saved = _tensors()[fqn]
    expected = saved[tuple(index) if isinstance(index, list) else index]
    got = ckpt.read(fqn, index)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_read_scalar_tensor(ckpt):
    got = ckpt.read("model.scalar")
    assert got.shape == () and torch.equal(got, _tensors()["model.scalar"])


def test_read_into_out(ckpt):
    saved = _tensors()["model.w"]
    out = torch.empty(3, 7, dtype=torch.float64)
    got = ckpt.read("model.w", slice(2, 5), out=out)
    assert got is out
    assert torch.equal(out, saved[2:5].double())


@pytest.mark.parametrize("fqn", sorted(VALUES))
def test_read_values(ckpt, fqn):
    got = ckpt.read(fqn)
    assert got == VALUES[fqn]
    assert type(got) is type(VALUES[fqn])


def test_read_values_flattened(tmp_path):
    """With DCP's default flattening, nested values become one key per leaf."""
    path = str(tmp_path / "flat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"w": torch.ones(2), **VALUES},
            storage_writer=UCPWriter(path),
            planner=UCPSavePlanner(),
            no_dist=True,
        )
    ckpt = open_checkpoint(path)
    assert ckpt.read("config.opt.betas") == [0.9, 0.95]
    assert ckpt.read("config.name") == "adamw"
    assert ckpt.read("config.n") is None
    assert ckpt.read("blob") == VALUES["blob"]
    assert ckpt.read("schedule") == VALUES["schedule"]
    assert "config" not in ckpt


def test_unknown_key(ckpt, ckpt_path):
    for call in (ckpt.read, ckpt.shape, ckpt.dtype):
        with pytest.raises(KeyError) as e:
            call("model.missing")
        msg = e.value.args[0]
        assert "'model.missing'" in msg
        assert ckpt_path in msg


def test_value_key_is_not_a_tensor(ckpt, ckpt_path):
    with pytest.raises(KeyError) as e:
        ckpt.shape("step")
    assert "non-tensor" in e.value.args[0] and ckpt_path in e.value.args[0]
    with pytest.raises(IndexError, match="non-tensor"):
        ckpt.read("step", 0)


@pytest.mark.parametrize(
    "fqn, index",
    [
        ("model.w", 13),
        ("model.w", -14),
        ("model.w", (0, 7)),
        ("model.w", (0, -8)),
        ("model.vec", 11),
        ("model.w", (0, 0, 0)),
        ("model.cube", (1, 2, 3, 0)),
    ],
)
def test_out_of_range_index(ckpt, fqn, index):
    with pytest.raises(IndexError) as e:
        ckpt.read(fqn, index)
    assert fqn in str(e.value)
    with pytest.raises(IndexError):  # torch agrees it is out of range
        _tensors()[fqn][index]


@pytest.mark.parametrize(
    "index", [slice(0, 10, 2), slice(None, None, -1), (slice(None), slice(1, 5, 3))]
)
def test_step_slices_are_rejected(ckpt, index):
    with pytest.raises(IndexError, match=re.escape("only step-1 slices")):
        ckpt.read("model.w", index)


def test_bad_index_type(ckpt):
    with pytest.raises(TypeError, match="int or slice"):
        ckpt.read("model.w", (0.5,))


def _band_bytes(ckpt, row_bytes: int) -> int:
    """Bytes of one band of checksum blocks: a one-row read is verified reading its band."""
    meta = ckpt.metadata
    return meta.checksum_block_bytes // min(row_bytes, meta.checksum_block_width) * row_bytes


def test_slice_of_one_row_reads_about_one_row(ckpt_path):
    ckpt = open_checkpoint(ckpt_path)
    saved = _tensors()["model.big"]
    row_bytes = saved.shape[1] * saved.element_size()
    for index in (0, 100, (slice(200, 201),), -1):
        before = ckpt.stats.bytes_read
        got = ckpt.read("model.big", index)
        read = ckpt.stats.bytes_read - before
        assert torch.equal(got, saved[index])
        assert row_bytes <= read <= _band_bytes(ckpt, row_bytes)
        assert read <= saved.numel() * saved.element_size() // 8  # far below the whole tensor
    assert ckpt.stats.bytes_needed == 4 * row_bytes
    assert ckpt.stats.bytes_verified >= ckpt.stats.bytes_needed


# -- a checkpoint saved by 2 ranks with DTensors -------------------------------------------------


def _sharded_reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    return {
        "big": torch.randn(256, 1024, generator=g),
        "odd": torch.randn(9, 13, generator=g),  # uneven: 7 + 6 columns
        "emb": torch.randn(8, 10, generator=g).to(torch.bfloat16),
    }


def save_sharded_rank(path: str) -> dict:
    """Rank function: every tensor as a DTensor sharded over columns on a 2-rank mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    state = {
        "model": {
            k: distribute_tensor(v, mesh, [Shard(1)]) for k, v in _sharded_reference().items()
        },
        "step": 5,
    }
    dcp.save(state, storage_writer=UCPWriter(path), planner=UCPSavePlanner())
    return {k: list(v.to_local().shape) for k, v in state["model"].items()}


@pytest.fixture(scope="module")
def sharded_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    local_shapes = run_distributed(save_sharded_rank, 2, path)
    assert local_shapes[0]["odd"] == [9, 7] and local_shapes[1]["odd"] == [9, 6]
    return path


def test_sharded_checkpoint_metadata(sharded_path):
    ckpt = open_checkpoint(sharded_path)
    meta = ckpt.metadata
    assert meta.world_size == 2
    for fqn, ref in _sharded_reference().items():
        entry = meta.tensors[f"model.{fqn}"]
        assert entry.shape == tuple(ref.shape) and entry.dtype == ref.dtype
        assert entry.fragments == 2
        assert sorted(f.rank for f in ckpt.fragments(f"model.{fqn}")) == [0, 1]
        assert [str(p) for p in entry.placements] == ["Shard(1)"]
    assert ckpt.read("step") == 5


@pytest.mark.parametrize("fqn", sorted(_sharded_reference()))
def test_sharded_full_read(sharded_path, fqn):
    ref = _sharded_reference()[fqn]
    got = open_checkpoint(sharded_path).read(f"model.{fqn}")
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref)


SHARDED_INDICES = [
    0,
    -1,
    (slice(2, 5),),
    (slice(None), slice(3, 10)),  # crosses the shard boundary of "odd" (col 7)
    (slice(1, 8), 6),
    (slice(1, 8), 7),
    (4, slice(5, 9)),
    (-2, -1),
]


@pytest.mark.parametrize("index", SHARDED_INDICES, ids=repr)
@pytest.mark.parametrize("fqn", ["odd", "emb", "big"])
def test_sharded_sliced_read(sharded_path, fqn, index):
    ref = _sharded_reference()[fqn]
    got = open_checkpoint(sharded_path).read(f"model.{fqn}", index)
    assert torch.equal(got, ref[index])


def test_sharded_row_read_volume(sharded_path):
    ckpt = open_checkpoint(sharded_path)
    ref = _sharded_reference()["big"]
    row_bytes = ref.shape[1] * ref.element_size()
    got = ckpt.read("model.big", 77)
    assert torch.equal(got, ref[77])
    assert ckpt.stats.bytes_needed == row_bytes
    assert row_bytes <= ckpt.stats.bytes_read <= _band_bytes(ckpt, row_bytes)
    assert ckpt.stats.bytes_read <= ref.numel() * ref.element_size() // 8
