"""The layout-independent content hash (issue 15): recorded at save, checked by ``verify_load``.

- The hash of any cut of a tensor into boxes adds up to the element-by-element reference, for
  every element size and for boxes that cross the multiplier tables' 2^16-element blocks.
- Saves on 4 ranks (FSDP ``Shard(0)``, HSDP 2x2) record the hash of the full tensor; loads on
  4 -> 2, 2x2 -> 4, 4 -> 2x2 (replicas counted) and into 1 process pass ``verify_load`` and are
  bit-exact.
- A changed byte of a tensor's data (checksums off, so only the content hash can see it) and a
  wrong fragment placement (two fragments' data swapped in re-signed indexes, every checksum
  valid) raise :class:`~torch_ucp.ContentMismatchError` naming the tensor; ranks that disagree
  on ``verify_load`` get one clear error, no hang; a checkpoint without hashes still loads.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import torch_ucp
from tests.support import format_v2 as spec
from tests.support.dcp_io import load_plain, save_plain
from tests.support.matrix import TENSORS, reference
from torch_ucp import ContentMismatchError, UCPLoadPlanner, UCPReader
from torch_ucp.cli.main import main as cli_main
from torch_ucp.demo.launch import run_distributed
from torch_ucp.metadata import content_hash
from torch_ucp.metadata.content_hash import box_hash, tensor_hash, words_of
from torch_ucp.verify import verify_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]

BIG = (300, 257)  # 77100 elements: fragments cross the tables' 2^16-element blocks


def reference_hash(tensor: torch.Tensor) -> int:
    """The hash of a whole tensor by the spec's element-by-element definition (slow)."""
    t = tensor.detach().contiguous()
    return int(spec.content_hash(t.reshape(-1).view(torch.uint8).numpy().tobytes(), t.dtype.itemsize), 16)

def _full(name: str) -> torch.Tensor:
    if name == "big":
        return torch.randn(BIG, generator=torch.Generator().manual_seed(15))
    return reference(name)


NAMES = [*TENSORS, "big"]


# -- the hash itself ------------------------------------------------------------------------------
def _random_cut(shape: tuple[int, ...], rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """``shape`` cut into boxes by random cuts along every dim."""
    cuts = []
    for n in shape:
        inner = sorted(set(rng.integers(1, n, size=min(3, max(n - 1, 0))).tolist())) if n > 1 else []
        cuts.append([0, *inner, n])
    boxes = []
    for index in np.ndindex(*[len(c) - 1 for c in cuts]):
        offsets = [cuts[d][i] for d, i in enumerate(index)]
        lengths = [cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(index)]
        boxes.append((offsets, lengths))
    return boxes


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.bfloat16, torch.float32, torch.int64, torch.float64, torch.complex128]
)
def test_any_cut_adds_up_to_the_reference(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(1)
    for shape in [(), (7,), (5, 3), (4, 3, 6), (70000,), (3, 40000), (600, 130)]:
        if dtype == torch.bool:
            full = torch.rand(shape, generator=g) > 0.5
        elif dtype == torch.complex128:
            full = torch.randn(shape, generator=g, dtype=torch.complex128)
        elif dtype in (torch.uint8, torch.int64):
            full = torch.randint(0, 250, shape, generator=g).to(dtype)
        else:
            full = torch.randn(shape, generator=g).to(dtype)
        expected = reference_hash(full) if full.numel() < 5000 else None
        whole = tensor_hash(full, (0,) * full.ndim, shape)
        if expected is not None:
            assert whole == expected, shape
        total = 0
        for offsets, lengths in _random_cut(shape, rng):
            box = full[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            total = content_hash.add(total, tensor_hash(box, offsets, shape))
        assert total == whole, (shape, dtype)


def test_the_vectorized_hash_equals_the_reference_across_blocks() -> None:
    """Runs of every kind (long, many short ones, crossing a 2^16 block) against the
    element-by-element definition on a tensor of 2^17 + 5 elements."""
    full = torch.randint(0, 2**31, (2**17 + 5,), dtype=torch.int64)
    assert tensor_hash(full, (0,), full.shape) == reference_hash(full)
    grid = full[: 1023 * 128].reshape(1023, 128)
    box = grid[500:520, 3:100]  # 20 short runs, one crossing index 65536
    words = words_of(box.contiguous().numpy().view(np.uint8), 8)
    expected = 0
    for r in range(20):
        for c in range(97):
            w = int(box[r, c])
            expected += (w ^ (w >> 32)) * spec.content_multiplier((500 + r) * 128 + 3 + c)
    assert box_hash(words, (500, 3), (20, 97), (1023, 128), 8) == expected & content_hash.MASK


def test_one_changed_element_or_two_swapped_rows_change_the_hash() -> None:
    full = torch.randn(64, 33, generator=torch.Generator().manual_seed(3))
    h = tensor_hash(full, (0, 0), full.shape)
    changed = full.clone()
    changed.view(torch.int32)[17, 5] ^= 1  # the lowest mantissa bit
    assert tensor_hash(changed, (0, 0), full.shape) != h
    swapped = full.clone()
    swapped[[3, 40]] = full[[40, 3]]
    assert tensor_hash(swapped, (0, 0), full.shape) != h


# -- save and load in many layouts ----------------------------------------------------------------
def _state(mesh, placements, fill: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name in NAMES:
        full = _full(name) if fill else torch.zeros_like(_full(name))
        if mesh is None:
            out[name] = full
        else:
            dims = [Shard(p.dim % full.ndim) if isinstance(p, Shard) else p for p in placements] if full.ndim else [
                Replicate() for _ in placements
            ]
            out[name] = distribute_tensor(full, mesh, dims, src_data_rank=None)
    return out


def _layout(kind: str):
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if kind == "fsdp":
        return init_device_mesh("cpu", (world,)), (Shard(0),)
    if kind == "hsdp":
        return init_device_mesh("cpu", (2, world // 2)), (Replicate(), Shard(0))
    raise ValueError(kind)


def _check_equal(state: dict[str, torch.Tensor]) -> list[str]:
    wrong = []
    for name, t in state.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if not torch.equal(full, _full(name)):
            wrong.append(name)
    return wrong


def _save_and_cross_load(base: str) -> dict:
    """4 ranks: save FSDP and HSDP checkpoints, then load HSDP -> FSDP and FSDP -> HSDP with
    ``verify_load`` (in HSDP every shard is loaded by both replica groups)."""
    torch.set_num_threads(1)
    for kind in ("fsdp", "hsdp"):
        mesh, placements = _layout(kind)
        torch_ucp.save(_state(mesh, placements, True), f"{base}/{kind}")
    out = {}
    for src, dst in (("hsdp", "fsdp"), ("fsdp", "hsdp")):
        mesh, placements = _layout(dst)
        state = _state(mesh, placements, False)
        torch_ucp.load(state, f"{base}/{src}", verify_load=True)
        out[f"{src}->{dst}"] = _check_equal(state)
    return out


def _load_on_two(base: str) -> dict:
    """2 ranks: 4 -> 2 with ``verify_load`` (and a load where only rank 0 asks for it)."""
    torch.set_num_threads(1)
    mesh, placements = _layout("fsdp")
    state = _state(mesh, placements, False)
    torch_ucp.load(state, f"{base}/fsdp", verify_load=True)
    out = {"wrong": _check_equal(state)}
    try:
        dcp.load(
            _state(mesh, placements, False),
            storage_reader=UCPReader(f"{base}/fsdp", verify_load=dist.get_rank() == 0),
            planner=UCPLoadPlanner(),
        )
        out["mixed"] = "loaded"
    except BaseException as e:  # noqa: BLE001 - CheckpointException: what each rank got
        error = torch_ucp.rank_error(e)
        out["mixed"] = str(error) if error is not None else repr(e)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = str(tmp_path_factory.mktemp("content-hash"))
    results = run_distributed(_save_and_cross_load, 4, base)
    for rank, r in enumerate(results):
        assert r == {"hsdp->fsdp": [], "fsdp->hsdp": []}, (rank, r)
    return base


def test_saves_on_four_ranks_record_the_full_tensors_hash(saved: str) -> None:
    for kind in ("fsdp", "hsdp"):
        header = spec.read_header(f"{saved}/{kind}")
        assert header["content_hash"] == {"algorithm": "mlh64"}
        for name in NAMES:
            assert header["tensors"][name]["content_hash"] == f"{reference_hash(_full(name)):016x}", (kind, name)


def test_four_to_two_ranks_and_a_mixed_request(saved: str) -> None:
    results = run_distributed(_load_on_two, 2, saved)
    for r in results:
        assert r["wrong"] == []
        assert "verify_load must be given to the UCPReader of every rank" in r["mixed"], r


@pytest.mark.parametrize("kind", ["fsdp", "hsdp"])
def test_one_process_loads_verify(saved: str, kind: str) -> None:
    state = _state(None, (), False)
    torch_ucp.load(state, f"{saved}/{kind}", verify_load=True)
    assert _check_equal(state) == []


# -- what the check catches -----------------------------------------------------------------------
def test_a_changed_byte_is_named(tmp_path) -> None:
    path = str(tmp_path / "c")
    state = {"w": torch.randn(40, 30), "ids": torch.arange(100)}
    save_plain(path, state)
    index = spec.read_index(path, spec.read_header(path), 0)
    row = int(np.flatnonzero(index["tensor_key"] == spec.tensor_key("w"))[0])
    with open(os.path.join(path, index["names"][int(index["object"][row])]), "r+b") as f:
        f.seek(int(index["byte_offset"][row]) + 1234)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    target = {"w": torch.zeros(40, 30), "ids": torch.zeros(100, dtype=torch.int64)}
    with pytest.raises(ContentMismatchError, match="'w'") as e:
        torch_ucp.load(target, path, verify=False, verify_load=True)
    assert e.value.tensors == ["w"]
    torch_ucp.load(target, path, verify=False)  # without the check it loads, wrong
    assert not torch.equal(target["w"], state["w"])


def _save_sharded(path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    torch_ucp.save({"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)}, path)


def test_a_wrong_fragment_placement_is_named(tmp_path) -> None:
    """Rank 0's index now points at rank 1's bytes and the other way round: every checksum
    (header, indexes, data blocks) is valid and the tiling is exact, the tensor is wrong."""
    path = str(tmp_path / "c")
    run_distributed(_save_sharded, 2, path)
    header = spec.read_header(path)
    first, second = (spec.read_index(path, header, r) for r in (0, 1))
    spec.write_index(path, header, dict(second, rank=0, offsets=first["offsets"], lengths=first["lengths"]))
    spec.write_index(path, header, dict(first, rank=1, offsets=second["offsets"], lengths=second["lengths"]))
    spec.write_header(path, header)
    target = {"w": torch.zeros(8, 6)}
    torch_ucp.load(target, path)  # loads, rows swapped
    assert torch.equal(target["w"][:4], torch.arange(24, 48, dtype=torch.float32).reshape(4, 6))
    with pytest.raises(ContentMismatchError, match="'w'"):
        torch_ucp.load({"w": torch.zeros(8, 6)}, path, verify_load=True)
    assert verify_checkpoint(path).ok  # every checksum is valid
    report = verify_checkpoint(path, logical=True)
    assert len(report.problems) == 1 and report.problems[0].startswith("'w': content hash of its fragments")


def test_verify_logical_on_the_command_line(saved: str, tmp_path, capsys) -> None:
    assert cli_main(["verify", "--logical", f"{saved}/hsdp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {saved}/hsdp: {len(NAMES)} tensors") and f"{len(NAMES)} content hashes" in out
    path = str(tmp_path / "c")
    save_plain(path, {"w": torch.randn(3)}, content_hash=False)
    assert cli_main(["verify", "--logical", path]) == 1
    assert "records no content hashes" in capsys.readouterr().out
    assert cli_main(["verify", path]) == 0  # without --logical: nothing is missing


def test_a_checkpoint_without_hashes_loads_with_a_warning(tmp_path, caplog) -> None:
    path = str(tmp_path / "c")
    state = {"w": torch.randn(5, 4)}
    save_plain(path, state, content_hash=False)
    header = json.loads(open(os.path.join(path, ".metadata")).read())
    assert "content_hash" not in header and "content_hash" not in header["tensors"]["w"]
    target = {"w": torch.zeros(5, 4)}
    with caplog.at_level(logging.WARNING, logger="torch_ucp"):
        load_plain(path, target, verify_load=True)
    assert torch.equal(target["w"], state["w"])
    assert "records no content hash" in caplog.text and "w" in caplog.text


def test_a_hash_that_is_not_16_hex_digits_is_refused(tmp_path) -> None:
    path = str(tmp_path / "c")
    save_plain(path, {"w": torch.randn(3)})
    header = spec.read_header(path)
    header["tensors"]["w"]["content_hash"] = "xyz"
    spec.write_header(path, header)
    with pytest.raises(torch_ucp.UnsupportedFormatError, match="content_hash.*16 lowercase hex"):
        torch_ucp.load({"w": torch.zeros(3)}, path)

