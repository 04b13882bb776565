"""``torch-ucp inspect / export / convert`` through the installed console script (issue 6).

Every command runs as a subprocess, as a user runs it (``torch-ucp ...`` and
``python -m torch_ucp ...``), on:

- a torch_ucp checkpoint saved by 2 gloo ranks with DTensors (Shard(0), Shard(1), Replicate,
  uneven shards) and plain tensors of every dtype HF weights use, plus non-tensor values;
- a stock DCP checkpoint (``dcp.save(sd, checkpoint_id=dir)``);
- the same torch_ucp checkpoint on a real local S3 server, reached with ``-o endpoint_url=...``.

Exports are read back with ``safetensors.torch.load_file`` / ``torch.load`` and compared bit for
bit; bad inputs must exit non-zero with ONE line on stderr and no traceback; exporting a 1 GiB
checkpoint must stay far below 1 GiB of peak RSS (tensors are streamed one at a time).

Each command costs a Python + torch start-up (seconds on a loaded 2-core machine), so the
module fixture ``cli`` starts every independent command at once, a few at a time, as soon as
the checkpoints exist; each test then waits for and checks its own command's result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support.console import TORCH_UCP
from torch_ucp import CheckpointExistsError, UCPSavePlanner, UCPWriter, open_checkpoint
from torch_ucp.demo.launch import run_distributed
from torch_ucp.storage.builder import CheckpointBuilder
from torch_ucp.storage.writer import ITEM_ALIGNMENT
from torch_ucp.verify import verify_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]

MiB = 1 << 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    """``torch-ucp ARGS`` (or ``python -m torch_ucp ARGS``); stderr is not a TTY: no bar."""
    cmd = [sys.executable, "-m", "torch_ucp", *args] if module else [TORCH_UCP, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- checkpoints


def ucp_reference() -> dict[str, torch.Tensor]:
    """Full tensors of the 2-rank checkpoint, one per dtype safetensors holds."""
    g = torch.Generator().manual_seed(7)
    return {
        "model.embed.weight": torch.randn(13, 7, generator=g),  # Shard(0): 7 + 6 rows
        "model.proj.weight": torch.randn(6, 10, generator=g).to(torch.bfloat16),  # Shard(1)
        "model.norm.weight": torch.randn(9, generator=g).half(),  # Replicate
        "model.ids": torch.randint(-(2**40), 2**40, (5, 3), generator=g),  # Shard(0), int64
        "model.mask": torch.rand(7, 3, generator=g) > 0.5,  # Shard(0), bool
        "model.count": torch.randint(-1000, 1000, (4,), generator=g, dtype=torch.int32),
        "model.q": torch.randint(-128, 128, (3, 4), generator=g, dtype=torch.int8),
        "model.pixels": torch.randint(0, 256, (2, 5), generator=g, dtype=torch.uint8),
        "model.scale": torch.tensor(0.25),  # 0-d
    }


UCP_VALUES = {"step": 42, "run": "tiny-debug"}
SHARDED = {
    "model.embed.weight": "Shard(0)",
    "model.proj.weight": "Shard(1)",
    "model.norm.weight": "Replicate()",
    "model.ids": "Shard(0)",
    "model.mask": "Shard(0)",
}
FRAGMENTS = {"Shard(0)": 2, "Shard(1)": 2, "Replicate()": 1}


def _save_ucp(path: str) -> int:
    """Rank function: DTensors on a 1-D mesh named dp, plain tensors and values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    placements = {"Shard(0)": [Shard(0)], "Shard(1)": [Shard(1)], "Replicate()": [Replicate()]}
    model = {}
    for key, t in ucp_reference().items():
        name = key.removeprefix("model.")
        if key in SHARDED:
            model[name] = distribute_tensor(t, mesh, placements[SHARDED[key]], src_data_rank=None)
        else:
            model[name] = t
    dcp.save({"model": model, **UCP_VALUES}, storage_writer=UCPWriter(path), planner=UCPSavePlanner())
    return 0


def stock_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {
            "w": torch.randn(6, 4, generator=g),
            "h": torch.randn(5, generator=g).half(),
            "b": torch.randint(0, 100, (3,), generator=g, dtype=torch.int32),
        },
        "step": 5,
        "sched": {"lr": 0.5, "name": "cosine"},
    }


def _options_args(options: dict) -> list[str]:
    """Storage options as ``-o KEY=VALUE`` (JSON for non-strings), as a user types them."""
    args = []
    for key, value in options.items():
        args += ["-o", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


class Commands:
    """Runs named commands in parallel (``workers`` at a time); ``get`` waits for one."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, "cli")
        self.futures: dict[str, Future] = {}
        self.paths: dict[str, str] = {}

    def start(self, name: str, *args: str, module: bool = False, after: str | None = None) -> None:
        def job() -> subprocess.CompletedProcess:
            if after is not None:  # submitted earlier, so already running or done
                self.futures[after].result()
            return run(*args, module=module)

        self.futures[name] = self.pool.submit(job)

    def get(self, name: str) -> subprocess.CompletedProcess:
        return self.futures[name].result()

    def ok(self, name: str) -> subprocess.CompletedProcess:
        proc = self.get(name)
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr}"
        return proc


@pytest.fixture(scope="module")
def cli(tmp_path_factory, s3_server):
    base = tmp_path_factory.mktemp("cli")
    ucp, stock = str(base / "ucp"), str(base / "stock")
    dcp.save(stock_state(), checkpoint_id=stock, no_dist=True)
    run_distributed(_save_ucp, 2, ucp)
    bucket = s3_server.create_bucket()
    options = s3_server.storage_options()
    fs, _ = fsspec.url_to_fs(f"s3://{bucket}", **options)
    fs.put(ucp, f"{bucket}/run/step-1", recursive=True)
    s3_url = f"s3://{bucket}/run/step-1"

    # bad inputs
    (base / "notes").mkdir()
    (base / "notes" / "readme.txt").write_text("hello")
    shutil.copytree(ucp, base / "v99")
    meta = json.loads((base / "v99" / ".metadata").read_text())
    meta["version"] = 99
    (base / "v99" / ".metadata").write_text(json.dumps(meta))

    c = Commands(workers=3)
    c.paths = {"base": str(base), "ucp": ucp, "stock": stock, "s3": s3_url}
    out = str(base / "out")
    c.start("inspect_ucp", "inspect", ucp)
    c.start("inspect_ucp_json", "inspect", ucp, "--json", module=True)
    c.start("inspect_stock", "inspect", stock, "--trust-pickle")  # a stock .metadata is a pickle
    c.start("inspect_stock_json", "inspect", "--json", "--trust-pickle", stock, module=True)
    c.start("export", "export", ucp, f"{out}/hf")
    c.start(
        "export_sharded", "export", ucp, f"{out}/sharded", "--max-shard-size", "200B",
        "--dtype", "bfloat16", "-q",
    )
    c.start("export_torch", "export", ucp, f"{out}/full.pt", "--format", "torch", module=True)
    c.start("convert", "convert", stock, f"{out}/converted", "--trust-pickle")
    c.start("verify", "verify", f"{out}/converted", after="convert")
    c.start("bad_missing", "inspect", str(base / "missing"))
    c.start("bad_not_checkpoint", "export", str(base / "notes"), f"{out}/never")
    c.start("bad_version", "convert", str(base / "v99"), f"{out}/never")
    opts = _options_args(options)
    c.start("s3_inspect", "inspect", s3_url, "--json", "--keys", "model.*.weight", "step", *opts)
    c.start(
        "s3_export", "export", s3_url, f"{out}/from-s3", "--keys", "model.*.weight", "model.ids",
        "--strip-prefix", "model.", *opts,
    )
    yield c
    c.pool.shutdown(wait=True)
    s3_server.delete_bucket(bucket)


# ---------------------------------------------------------------------------------- inspect


def test_inspect_text_on_torch_ucp_checkpoint(cli):
    out = cli.ok("inspect_ucp").stdout
    ucp = cli.paths["ucp"]
    meta = open_checkpoint(ucp).metadata
    assert out.startswith(f"{ucp}: torch_ucp (format version 2)\n")
    assert f"save id {meta.save_id}, world size 2, {len(meta.indexes)} fragment indexes" in out
    rows = [line.split()[0] for line in out.splitlines()[4:-2]]
    assert rows == [*ucp_reference(), *UCP_VALUES]
    assert re.search(r"\nmodel\.embed\.weight +float32 +\[13, 7\] +364 B +2  mesh\(dp=2\) \[Shard\(0\)\]\n", out)
    assert re.search(r"\nmodel\.proj\.weight +bfloat16 +\[6, 10\] +120 B +2  mesh\(dp=2\) \[Shard\(1\)\]\n", out)
    assert re.search(r"\nmodel\.norm\.weight +float16 +\[9\] +18 B +1  mesh\(dp=2\) \[Replicate\(\)\]\n", out)
    assert re.search(r"\nmodel\.mask +bool +\[7, 3\] +21 B +2  mesh\(dp=2\) \[Shard\(0\)\]\n", out)
    assert re.search(r"\nmodel\.scale +float32 +\[\] +4 B +1  -\n", out)
    assert re.search(r"\nstep +value +json +2 B\n", out)
    assert out.endswith(f"\n9 tensors ({nbytes(ucp_reference())} B, 13 fragments), 2 values\n")


def test_inspect_json_on_torch_ucp_checkpoint(cli):
    info = json.loads(cli.ok("inspect_ucp_json").stdout)
    meta = open_checkpoint(cli.paths["ucp"]).metadata
    assert (info["format"], info["version"], info["world_size"]) == ("torch_ucp", 2, 2)
    assert info["save_id"] == meta.save_id and info["indexes"] == len(meta.indexes) == 2
    assert info["meshes"] == [{"shape": [2], "dim_names": ["dp"]}]
    ref = ucp_reference()
    assert list(info["tensors"]) == list(ref)
    for key, t in ref.items():
        entry = info["tensors"][key]
        assert entry["dtype"] == str(t.dtype).removeprefix("torch.")
        assert entry["shape"] == list(t.shape)
        assert entry["bytes"] == t.numel() * t.element_size()
        assert entry["fragments"] == FRAGMENTS.get(SHARDED.get(key, ""), 1), key
        if key in SHARDED:
            assert entry["mesh"] == {"shape": [2], "dim_names": ["dp"]}
        else:
            assert entry["mesh"] is None and entry["placements"] is None
    assert info["tensors"]["model.proj.weight"]["placements"] == [{"kind": "shard", "dim": 1}]
    assert info["values"] == {
        "step": {"encoding": "json", "bytes": 2},
        "run": {"encoding": "json", "bytes": 12},
    }
    assert info["totals"] == {
        "tensors": 9, "values": 2, "bytes": nbytes(ref), "fragments": 13, "keys_in_checkpoint": 11
    }


def test_inspect_stock_dcp_checkpoint(cli):
    stock = cli.paths["stock"]
    text = cli.ok("inspect_stock").stdout
    assert text.startswith(f"{stock}: dcp (format version")
    assert re.search(r"\nmodel\.w +float32 +\[6, 4\] +96 B +1  -\n", text)
    assert re.search(r"\nmodel\.b +int32 +\[3\] +12 B +1  -\n", text)
    assert re.search(r"\nsched\.name +value +torch_save", text)
    assert re.search(r"\nkey +dtype +shape +bytes +chunks  saved layout\n", text)
    assert text.endswith("\n3 tensors (118 B, 3 chunks), 3 values\n")
    info = json.loads(cli.ok("inspect_stock_json").stdout)
    assert info["format"] == "dcp" and info["world_size"] == 1 and info["data_objects"] == 1
    assert info["tensors"]["model.h"] == {
        "dtype": "float16", "shape": [5], "bytes": 10, "chunks": 1, "mesh": None, "placements": None
    }
    assert set(info["values"]) == {"step", "sched.lr", "sched.name"}
    assert info["values"]["step"]["encoding"] == "torch_save"


# ----------------------------------------------------------------------------------- export


def test_export_every_dtype_bit_exact(cli):
    proc = cli.ok("export")
    out = os.path.join(cli.paths["base"], "out", "hf")
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    loaded = load_file(os.path.join(out, "model.safetensors"))
    ref = ucp_reference()
    assert set(loaded) == set(ref)
    for key, t in ref.items():
        assert same(loaded[key], t), key
    assert {str(t.dtype) for t in loaded.values()} == {
        "torch.float32", "torch.bfloat16", "torch.float16", "torch.int64", "torch.bool",
        "torch.int32", "torch.int8", "torch.uint8",
    }
    assert proc.stderr.strip() == (
        "torch-ucp export: skipped 2 non-tensor values (safetensors holds tensors only): step, run"
    )
    assert proc.stdout.startswith("exported 9 tensors")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_sharded_with_index_and_dtype(cli):
    """--max-shard-size 200B --dtype bfloat16: HF shards + index; ints and bool keep their dtype."""
    cli.ok("export_sharded")
    out = os.path.join(cli.paths["base"], "out", "sharded")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f != "model.safetensors.index.json"]
    n = len(shards)
    assert n >= 3 and "model.safetensors.index.json" in files
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    expected = {
        k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in ucp_reference().items()
    }
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == nbytes(expected)
    seen = {}
    for shard in shards:
        part = load_file(os.path.join(out, shard))
        assert nbytes(part) <= 200 or len(part) == 1
        for key, t in part.items():
            assert index["weight_map"][key] == shard
            seen[key] = t
    assert set(seen) == set(expected)
    for key, t in expected.items():
        assert same(seen[key], t), key


def test_export_torch_format(cli):
    proc = cli.ok("export_torch")
    assert proc.stdout.startswith("exported 9 tensors") and "2 values" in proc.stdout
    state = torch.load(os.path.join(cli.paths["base"], "out", "full.pt"), weights_only=True)
    ref = ucp_reference()
    assert list(state) == [*ref, *UCP_VALUES]
    for key, t in ref.items():
        assert same(state[key], t), key
    assert {k: state[k] for k in UCP_VALUES} == UCP_VALUES


# ---------------------------------------------------------------------------------- convert


def test_convert_stock_dcp_then_verify(cli):
    dst = os.path.join(cli.paths["base"], "out", "converted")
    proc = cli.ok("convert")
    assert proc.stdout.startswith(f"converted dcp checkpoint {cli.paths['stock']} -> torch_ucp")
    assert cli.ok("verify").stdout.startswith(f"OK: {dst}: 3 tensors, 3 fragments, 3 values")
    ckpt = open_checkpoint(dst)
    state = stock_state()
    for name, t in state["model"].items():
        assert same(ckpt.read(f"model.{name}"), t), name
    assert (ckpt.read("step"), ckpt.read("sched.lr"), ckpt.read("sched.name")) == (5, 0.5, "cosine")
    assert ckpt.metadata.flatten_mapping["sched.lr"] == ["sched", "lr"]
    assert ckpt.metadata.values["step"].encoding == "json"  # no pickle any more


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "name, message",
    [
        ("bad_missing", r"^torch-ucp inspect: error: \S+/missing does not exist$"),
        ("bad_not_checkpoint", r"^torch-ucp export: error: \S+/notes is not a checkpoint: no \.metadata"),
        ("bad_version", r"^torch-ucp convert: error: \S+/v99/\.metadata has format version 99; "
                        r"this torch_ucp reads versions 1\.\.2"),
    ],
)
def test_bad_input_one_line_error(cli, name, message):
    proc = cli.get(name)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not os.path.exists(os.path.join(cli.paths["base"], "out", "never"))


# ---------------------------------------------------------------------------------------- S3


def test_s3_inspect_and_export_with_keys_and_strip_prefix(cli):
    """s3:// URLs with -o endpoint_url=... -o key=...; --keys selects, --strip-prefix renames."""
    info = json.loads(cli.ok("s3_inspect").stdout)
    assert info["url"] == cli.paths["s3"]
    assert (info["format"], info["world_size"], info["version"]) == ("torch_ucp", 2, 2)
    assert list(info["tensors"]) == ["model.embed.weight", "model.proj.weight", "model.norm.weight"]
    assert list(info["values"]) == ["step"]
    assert info["tensors"]["model.embed.weight"]["fragments"] == 2
    assert info["totals"]["tensors"] == 3 and info["totals"]["keys_in_checkpoint"] == 11
    proc = cli.ok("s3_export")
    assert proc.stderr == ""  # no value selected, nothing skipped
    loaded = load_file(os.path.join(cli.paths["base"], "out", "from-s3", "model.safetensors"))
    assert set(loaded) == {"embed.weight", "proj.weight", "norm.weight", "ids"}
    for name, t in loaded.items():
        assert same(t, ucp_reference()[f"model.{name}"]), name


# ---------------------------------------------------------------------- CheckpointBuilder


def test_builder_commit_overwrite_and_abort(tmp_path):
    url = str(tmp_path / "built")
    with CheckpointBuilder(url, max_object_bytes=100) as b:
        b.add_tensor("w", torch.arange(30.0).reshape(5, 6).t())  # non-contiguous input
        b.add_tensor("mask", torch.tensor([True, False, True]))
        b.add_value("meta", {"a": [1, 2]})
        with pytest.raises(ValueError, match="already added"):
            b.add_tensor("w", torch.zeros(1))
    report = verify_checkpoint(url)
    assert report.ok and (report.tensors, report.values) == (2, 1)
    ckpt = open_checkpoint(url)
    stored = [f.data for fqn in ckpt.metadata.tensors for f in ckpt.fragments(fqn)] + [
        v.data for v in ckpt.metadata.values.values()
    ]
    objects = {s.object for s in stored}
    assert len(objects) == 2  # 120 bytes of w, then a new object (max 100)
    assert all(o.startswith(f"data-{b.save_id}/00000-") for o in objects)
    assert all(s.byte_offset % ITEM_ALIGNMENT == 0 for s in stored)  # as UCPWriter lays them out
    assert torch.equal(open_checkpoint(url).read("w"), torch.arange(30.0).reshape(5, 6).t())

    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        CheckpointBuilder(url)
    with pytest.raises(RuntimeError, match="boom"), CheckpointBuilder(url, overwrite=True) as b2:
        b2.add_tensor("w", torch.ones(3))
        raise RuntimeError("boom")
    # the aborted save left the committed checkpoint and nothing else
    assert sorted(os.listdir(url)) == [".metadata", f"data-{b.save_id}"]
    assert open_checkpoint(url).metadata.save_id == b.save_id

    with CheckpointBuilder(url, overwrite=True) as b3:
        b3.add_tensor("x", torch.ones(2, dtype=torch.bfloat16))
    assert sorted(os.listdir(url)) == [".metadata", f"data-{b3.save_id}"]  # old data removed
    assert open_checkpoint(url).keys() == ["x"]


def test_convert_deepspeed_universal_layout_in_process(tmp_path, capsys):
    """The ds_to_universal layout (zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, found through
    latest_universal) -> torch_ucp. Run through the CLI's main() in this process: the file
    layout is what matters here, and it saves an interpreter start-up."""
    from torch_ucp.cli.main import main

    root = tmp_path / "ds"
    universal = root / "global_step3_universal"
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    states = {"fp32": w, "exp_avg": w * 0.1, "exp_avg_sq": w * w}
    (universal / "zero" / "layer.weight").mkdir(parents=True)
    (universal / "zero" / "frozen.bias").mkdir()
    for state, t in states.items():
        torch.save({"param": t, "cat_dim": 0}, universal / "zero" / "layer.weight" / f"{state}.pt")
    torch.save(torch.tensor(3.0), universal / "zero" / "layer.weight" / "step.pt")
    torch.save({"param": torch.ones(2)}, universal / "zero" / "frozen.bias" / "fp32.pt")
    (root / "latest_universal").write_text("global_step3_universal")

    assert main(["convert", str(root), str(tmp_path / "ucp")]) == 0
    assert "converted deepspeed_universal checkpoint" in capsys.readouterr().out
    ckpt = open_checkpoint(str(tmp_path / "ucp"))
    assert sorted(ckpt.keys()) == [
        "model.frozen.bias",
        "model.layer.weight",
        "optim.state.layer.weight.exp_avg",
        "optim.state.layer.weight.exp_avg_sq",
        "optim.state.layer.weight.step",
    ]
    assert same(ckpt.read("model.layer.weight"), w)
    assert same(ckpt.read("optim.state.layer.weight.exp_avg_sq"), w * w)
    assert ckpt.read("optim.state.layer.weight.step").item() == 3.0
    assert verify_checkpoint(str(tmp_path / "ucp")).ok


# -------------------------------------------------------------------------------- peak RSS

_MEASURE = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_export_of_1gib_checkpoint_streams(tmp_path):
    """8 tensors of 128 MiB: peak RSS of the export process stays far below the 1 GiB model."""
    ckpt, out = tmp_path / "big", tmp_path / "big-hf"
    n = 32 * MiB  # float32 elements = 128 MiB
    try:
        t0 = time.monotonic()
        with CheckpointBuilder(str(ckpt)) as builder:
            for i in range(8):
                builder.add_tensor(f"layers.{i}.weight", torch.arange(n, dtype=torch.float32) + i)
        t1 = time.monotonic()
        # a parent of its own, so RUSAGE_CHILDREN is the export process alone
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE, TORCH_UCP, "export", str(ckpt), str(out), "-q"],
            capture_output=True, text=True, env=ENV, timeout=240,
        )
        rc, maxrss_kib = (int(x) for x in proc.stdout.split())
        assert rc == 0, proc.stderr
        peak_mib = maxrss_kib / 1024
        print(f"\n1 GiB: build {t1 - t0:.1f}s, export {time.monotonic() - t1:.1f}s, "
              f"export peak RSS {peak_mib:.0f} MiB")
        assert peak_mib < 600, f"peak RSS {peak_mib:.0f} MiB"
        path = str(out / "model.safetensors")
        assert os.path.getsize(path) > 8 * 128 * MiB
        with safe_open(path, "pt") as f:
            assert sorted(f.keys()) == sorted(f"layers.{i}.weight" for i in range(8))
            for i in (0, 7):
                tail = f.get_slice(f"layers.{i}.weight")[n - 3 :]
                assert torch.equal(tail, torch.arange(n - 3, n, dtype=torch.float32) + i)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
