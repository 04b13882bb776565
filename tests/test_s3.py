"""torch_ucp on object storage: a real S3-compatible server on 127.0.0.1 (moto server mode),
reached through s3fs exactly as user code would; optionally through a fault-injecting proxy.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.support.fault_proxy import RETRY_STORAGE_OPTIONS, FaultProxy
from tests.support.matrix import reference
from tests.test_reshard_matrix import run_matrix
from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter, open_checkpoint
from torch_ucp.demo.launch import run_distributed
from torch_ucp.verify import verify_checkpoint

MATRIX_SAVE = ["ws1-plain", "ws2-shard1", "ws4-fsdp-tp-strided", "ws4-hsdp"]
MATRIX_LOAD = ["ws1-plain", "ws2-shard0", "ws4-2d-swapped"]


@pytest.fixture(scope="module")
def s3_matrix(s3_server):
    bucket = s3_server.create_bucket()
    return run_matrix(f"s3://{bucket}/matrix", s3_server.storage_options(), MATRIX_SAVE, MATRIX_LOAD)


@pytest.mark.parametrize("target", MATRIX_LOAD)
@pytest.mark.parametrize("source", MATRIX_SAVE)
def test_s3_reshard(s3_matrix, source, target):
    assert s3_matrix[f"{source}->{target}"] == []


def test_writer_and_reader_are_picklable(s3_bucket):
    url, options = s3_bucket
    writer = UCPWriter(f"{url}/x", **options)
    assert writer.store.fs is not None  # open the filesystem: live handles must not be pickled
    clone = pickle.loads(pickle.dumps(writer))
    assert clone.url == writer.url and clone.storage_options == options
    reader = pickle.loads(pickle.dumps(UCPReader(f"{url}/x", **options)))
    assert reader.checkpoint_id == f"{url}/x"


def _save_and_load_through(url: str, options: dict) -> list[str]:
    """Rank function: save Shard(0) over 2 ranks, load Shard(1), compare."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    names = ["w_even", "w_odd", "emb", "ids"]
    state = {n: distribute_tensor(reference(n), mesh, [Shard(0)], src_data_rank=None) for n in names}
    big = torch.randn(1024, 1536, generator=torch.Generator().manual_seed(1))  # 6 MiB: multipart
    state["big"] = distribute_tensor(big, mesh, [Shard(0)], src_data_rank=None)
    dcp.save(state, storage_writer=UCPWriter(url, **options), planner=UCPSavePlanner())
    target = {n: distribute_tensor(torch.zeros_like(reference(n)), mesh, [Shard(1)], src_data_rank=None) for n in names}
    target["big"] = distribute_tensor(torch.zeros_like(big), mesh, [Shard(1)], src_data_rank=None)
    dcp.load(target, storage_reader=UCPReader(url, **options), planner=UCPLoadPlanner())
    problems = [n for n in names if not torch.equal(target[n].full_tensor(), reference(n))]
    if not torch.equal(target["big"].full_tensor(), big):
        problems.append("big")
    return problems


def test_faults_are_retried(s3_server, monkeypatch):
    bucket = s3_server.create_bucket()
    monkeypatch.setenv("TORCH_UCP_RETRY_BASE_DELAY", "0.05")
    with FaultProxy(
        s3_server.endpoint_url,
        fail_rate=0.2,
        modes=("503", "500", "drop", "drop_after", "reset", "truncate"),
        seed=3,
    ) as proxy:
        options = proxy.storage_options(**RETRY_STORAGE_OPTIONS)
        results = run_distributed(_save_and_load_through, 2, f"s3://{bucket}/faulty", options)
        assert results == [[], []]
        # and a plain process reads it back through the faults, verifying every block
        ckpt = open_checkpoint(f"s3://{bucket}/faulty", verify=True, **options)
        assert torch.equal(ckpt.read("w_odd"), reference("w_odd"))
        assert proxy.failed > 0, proxy.stats()
    assert verify_checkpoint(f"s3://{bucket}/faulty", **s3_server.storage_options()).ok


def test_permanent_error_fails_cleanly(s3_server):
    options = s3_server.storage_options()
    with pytest.raises(BaseException, match="(?i)bucket|not found|NoSuchBucket"):
        dcp.save({"w": torch.ones(4)}, storage_writer=UCPWriter("s3://no-such-bucket-ucp/x", **options),
                 planner=UCPSavePlanner(), no_dist=True)


def test_s3_corruption_detected(s3_bucket):
    url, options = s3_bucket
    path = f"{url}/ckpt"
    dcp.save({"w": reference("w_even")}, storage_writer=UCPWriter(path, **options),
             planner=UCPSavePlanner(), no_dist=True)
    ckpt = open_checkpoint(path, **options)
    obj = ckpt.fragments("w")[0].data.object
    fs = ckpt.store.fs
    blob = bytearray(fs.cat_file(ckpt.store.path(obj)))
    blob[len(blob) // 2] ^= 0xFF
    fs.pipe_file(ckpt.store.path(obj), bytes(blob))
    with pytest.raises(Exception, match="checksum mismatch in tensor 'w'"):
        open_checkpoint(path, **options).read("w")
    report = verify_checkpoint(path, **options)
    assert not report.ok and "checksum mismatch" in report.problems[0]
