"""Tests of the S3 test infrastructure (tests/support/s3.py, tests/support/fault_proxy.py).

Everything goes over real HTTP to a moto server on 127.0.0.1 through s3fs, as
user code would.
"""

from __future__ import annotations

import errno
import http.client
import http.server
import os
import random
import threading
import time

import aiohttp
import botocore.exceptions
import fsspec
import pytest
import s3fs

from tests.support.fault_proxy import (
    NO_RETRY_STORAGE_OPTIONS,
    RETRY_STORAGE_OPTIONS,
    FaultProxy,
)

MiB = 2**20


def _fs(storage_options: dict, **extra) -> s3fs.S3FileSystem:
    """A fresh filesystem (no fsspec instance cache), built the way a user would."""
    fs, _ = fsspec.url_to_fs("s3://", skip_instance_cache=True, **storage_options, **extra)
    assert isinstance(fs, s3fs.S3FileSystem)
    return fs


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- server


def test_storage_options_shape(s3_server):
    opts = s3_server.storage_options(config_kwargs={"read_timeout": 7}, use_listings_cache=False)
    assert opts["endpoint_url"] == s3_server.endpoint_url
    assert opts["endpoint_url"].startswith("http://127.0.0.1:")
    assert opts["key"] and opts["secret"]
    assert opts["client_kwargs"] == {"region_name": "us-east-1"}
    # nested dicts are merged, not replaced: environment proxies stay disabled
    assert opts["config_kwargs"] == {"proxies": {}, "read_timeout": 7}
    assert opts["use_listings_cache"] is False
    assert s3_server.startup_seconds is not None and s3_server.startup_seconds < 30


def test_put_get_roundtrip(s3_bucket):
    url, opts = s3_bucket
    fs, root = fsspec.url_to_fs(url, **opts)
    data = _rand(100_000, 1)
    fs.pipe(f"{root}/dir/obj.bin", data)
    assert fs.cat_file(f"{root}/dir/obj.bin") == data
    assert fs.info(f"{root}/dir/obj.bin")["size"] == len(data)
    assert fs.exists(f"{root}/dir/obj.bin")
    with fsspec.open(f"{url}/dir/obj.bin", "rb", **opts) as f:
        assert f.read() == data
    with fsspec.open(f"{url}/text.txt", "w", **opts) as f:
        f.write("héllo")
    with fsspec.open(f"{url}/text.txt", "r", **opts) as f:
        assert f.read() == "héllo"
    fs.rm(f"{root}/dir/obj.bin")
    assert not fs.exists(f"{root}/dir/obj.bin")


def test_ranged_reads(s3_bucket):
    url, opts = s3_bucket
    fs, root = fsspec.url_to_fs(url, **opts)
    data = _rand(3 * MiB + 17, 2)
    path = f"{root}/ranges.bin"
    fs.pipe(path, data)
    rng = random.Random(3)
    starts = [rng.randrange(0, len(data) - 1) for _ in range(20)] + [0, len(data) - 5]
    ends = [min(len(data), s + rng.randrange(1, MiB)) for s in starts[:-2]] + [10, len(data)]
    got = fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise")
    assert got == [data[s:e] for s, e in zip(starts, ends, strict=True)]
    assert fs.cat_file(path, start=MiB, end=MiB + 4096) == data[MiB : MiB + 4096]
    with fs.open(path, "rb", block_size=256 * 1024) as f:
        f.seek(2 * MiB + 5)
        assert f.read(1000) == data[2 * MiB + 5 : 2 * MiB + 1005]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]


def test_multipart_upload(s3_bucket, s3_server):
    url, opts = s3_bucket
    fs, root = fsspec.url_to_fs(url, **opts)
    data = _rand(11 * MiB + 123, 4)
    path = f"{root}/mpu.bin"
    with fs.open(path, "wb", block_size=5 * MiB) as f:
        for i in range(0, len(data), MiB):  # written in pieces, like a serializer would
            f.write(data[i : i + MiB])
    info = fs.info(path, refresh=True)
    assert info["size"] == len(data)
    assert info["ETag"].strip('"').endswith("-3"), info["ETag"]  # 3 parts: 5 + 5 + 1 MiB
    assert fs.cat_file(path) == data
    bucket = root.split("/")[0]
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_listing(s3_bucket):
    url, opts = s3_bucket
    fs, root = fsspec.url_to_fs(url, **opts)
    names = ["a/0.bin", "a/1.bin", "a/b/2.bin", "c/3.txt", "top.json"]
    fs.pipe({f"{root}/{n}": n.encode() for n in names})
    assert sorted(fs.ls(root, detail=False)) == sorted(
        [f"{root}/a", f"{root}/c", f"{root}/top.json"]
    )
    assert sorted(fs.find(root)) == sorted(f"{root}/{n}" for n in names)
    assert sorted(fs.glob(f"{root}/a/*.bin")) == [f"{root}/a/0.bin", f"{root}/a/1.bin"]
    assert fs.du(f"{root}/a") == sum(len(n) for n in names if n.startswith("a/"))
    assert fs.isdir(f"{root}/a/b") and fs.isfile(f"{root}/a/b/2.bin")


def test_environment_does_not_interfere(s3_bucket, monkeypatch):
    url, opts = s3_bucket
    dead = "http://127.0.0.1:9"  # nothing listens there
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, dead)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    fs = _fs(opts)
    root = url[len("s3://") :]
    fs.pipe(f"{root}/env.bin", b"ok")
    assert fs.cat_file(f"{root}/env.bin") == b"ok"


def test_permanent_errors(s3_bucket):
    url, opts = s3_bucket
    fs = _fs(opts)
    root = url[len("s3://") :]
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/missing")
    with pytest.raises(FileNotFoundError) as ei:
        fs.cat_ranges([f"{root}/missing"], [0], [1], on_error="raise")
    assert ei.value.__cause__.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(FileNotFoundError) as ei:
        fs.pipe("no-such-bucket-for-torch-ucp/k", b"x")
    assert ei.value.__cause__.response["Error"]["Code"] == "NoSuchBucket"


# --------------------------------------------------------------------------- proxy


def test_proxy_passthrough_chunked_keepalive_range(s3_server, s3_bucket):
    url, _ = s3_bucket
    bucket = url[len("s3://") :]
    with FaultProxy(s3_server.endpoint_url, fail_rate=0.0) as px:
        body = [_rand(10_000, i) for i in range(5)]
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=30)
        try:
            # chunked request body (moto accepts this unsigned PUT)
            conn.request("PUT", f"/{bucket}/chunked.bin", body=iter(body), encode_chunked=True)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            # a second request on the same keep-alive connection
            conn.request("PUT", f"/{bucket}/plain.bin", body=b"plain")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        finally:
            conn.close()
        assert px.connections == 1 and px.requests == 2

        fs = _fs(px.storage_options())
        data = b"".join(body)
        assert fs.cat_file(f"{bucket}/chunked.bin") == data
        assert fs.cat_ranges([f"{bucket}/chunked.bin"] * 2, [5, 40_000], [17, 50_000]) == [
            data[5:17],
            data[40_000:50_000],
        ]
        assert fs.cat_file(f"{bucket}/plain.bin") == b"plain"
        assert px.failed == 0 and px.forwarded == px.requests


def test_s3fs_survives_faults(s3_server, s3_bucket):
    url, _ = s3_bucket
    bucket = url[len("s3://") :]
    modes = ("503", "500", "drop", "drop_after", "reset", "truncate")
    with FaultProxy(s3_server.endpoint_url, fail_rate=0.2, modes=modes, seed=7) as px:
        fs = _fs(px.storage_options(**RETRY_STORAGE_OPTIONS))
        # enough requests (~100) that several fault kinds are hit whatever the bucket name
        objs = {f"{bucket}/small/{i}.bin": _rand(20_000 + i, 10 + i) for i in range(16)}
        for path, data in objs.items():
            fs.pipe_file(path, data)
        for path, data in objs.items():
            assert fs.cat_file(path) == data
            assert fs.info(path)["size"] == len(data)
        paths = list(objs)
        got = fs.cat_ranges(paths, [100] * len(paths), [5000] * len(paths), on_error="raise")
        assert got == [objs[p][100:5000] for p in paths]
        with fs.open(paths[0], "rb", cache_type="none") as f:
            f.seek(7)
            assert f.read(300) == objs[paths[0]][7:307]

        big = _rand(11 * MiB, 99)
        with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * MiB) as f:
            f.write(big)
        assert fs.cat_file(f"{bucket}/big.bin") == big
        assert sorted(fs.ls(f"{bucket}/small", detail=False, refresh=True)) == sorted(paths)
        fs.rm(paths[-1])
        assert not fs.exists(paths[-1])

        stats = px.stats()
    print(stats)
    assert stats["failed"] > 0, stats
    assert len(stats["faults"]) >= 3, stats  # several different fault kinds were hit
    assert stats["requests"] > stats["forwarded"], stats


def test_proxy_bandwidth_limits_all_connections_together(s3_server, s3_bucket):
    """Two concurrent GETs through a 10 MB/s proxy share the 10 MB/s: together they cannot take
    less than their bytes over the rate (less the burst credit); bodies arrive intact."""
    url, _ = s3_bucket
    bucket = url[len("s3://") :]
    objs = {f"{bucket}/bw/{i}.bin": _rand(2 * MiB, 40 + i) for i in range(2)}
    fs = _fs(s3_server.storage_options())
    for path, data in objs.items():
        fs.pipe_file(path, data)
    rate, burst = 10e6, 0.05
    with FaultProxy(s3_server.endpoint_url, fail_rate=0.0, bandwidth=rate, bandwidth_burst=burst) as px:
        got: dict[str, bytes] = {}
        readers = [threading.Thread(target=lambda p=p: got.__setitem__(p, _fs(px.storage_options()).cat_file(p)))
                   for p in objs]
        t0 = time.monotonic()
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        elapsed = time.monotonic() - t0
        assert got == objs
        assert px.get_bytes == 4 * MiB
    assert elapsed >= 4 * MiB / rate - burst, elapsed
    with pytest.raises(ValueError, match="bandwidth"):
        FaultProxy(s3_server.endpoint_url, bandwidth=0)


_NO_RETRY_CASES = {
    # mode: (operation, expected exception type, check on the exception)
    "503": ("get", OSError, lambda e: e.errno == errno.EBUSY),
    "500": ("put", OSError, lambda e: e.errno == getattr(errno, "EREMOTEIO", errno.EIO)),
    "403": ("put", PermissionError, lambda e: True),
    "drop": ("put", botocore.exceptions.ConnectionClosedError, lambda e: True),
    "reset": ("get", aiohttp.ClientPayloadError, lambda e: True),  # cut mid-body
    "truncate": ("list", botocore.exceptions.ConnectionClosedError, lambda e: True),
    "slow": ("get", botocore.exceptions.ReadTimeoutError, lambda e: True),
}
_OP_METHOD = {"get": "GET", "put": "PUT", "list": "GET"}


@pytest.fixture(scope="module")
def no_retry_proxy(s3_server):
    """One proxy (faults off until a test turns them on) and a bucket with an object."""
    bucket = s3_server.create_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="obj", Body=b"x" * 4000)
    with FaultProxy(s3_server.endpoint_url, fail_rate=0.0, slow_seconds=1.5) as px:
        yield px, bucket
    s3_server.delete_bucket(bucket)


@pytest.mark.parametrize("mode", sorted(_NO_RETRY_CASES))
def test_fault_surfaces_without_retries(no_retry_proxy, mode):
    """With every retry layer off each fault kind reaches the caller as documented."""
    px, bucket = no_retry_proxy
    op, exc_type, check = _NO_RETRY_CASES[mode]
    read_timeout = 0.5 if mode == "slow" else 30
    extra = {
        "config_kwargs": {**NO_RETRY_STORAGE_OPTIONS["config_kwargs"], "read_timeout": read_timeout}
    }
    fs, _ = fsspec.url_to_fs("s3://", **px.storage_options(**extra))  # cached per options
    fs.retries = 1  # s3fs's own retry loop off
    calls = {
        "get": lambda: fs.cat_file(f"{bucket}/obj", start=0, end=4000),  # a single GET
        "put": lambda: fs.pipe_file(f"{bucket}/new", b"y"),
        "list": lambda: fs.ls(bucket, refresh=True),
    }
    px.reset_stats()
    px.modes, px.methods, px.fail_rate = (mode,), frozenset({_OP_METHOD[op]}), 1.0
    try:
        with pytest.raises(exc_type) as ei:
            calls[op]()
    finally:
        px.fail_rate = 0.0
    assert check(ei.value), repr(ei.value)
    assert px.faults == {mode: px.requests}, px.stats()


class _OkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        # one write: separate header/body segments would meet Nagle + delayed ACK
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def log_message(self, *args):
        pass


def test_decisions_are_deterministic():
    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OkHandler)
    threading.Thread(
        target=target.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    target_url = f"http://127.0.0.1:{target.server_address[1]}"

    def run(seed: int, **kw) -> list:
        with FaultProxy(target_url, fail_rate=0.3, modes=("503", "500"), seed=seed, **kw) as px:
            conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=30)
            try:
                for i in range(40):
                    conn.request("GET", f"/bucket/key?i={i % 10}", headers={"Range": "bytes=0-1"})
                    conn.getresponse().read()
            finally:
                conn.close()
            assert px.connections == 1
            return [mode for _, _, mode in px.log]

    try:
        a, b, c = run(1), run(1), run(2)
        assert a == b
        assert a != c
        assert 0 < sum(m is not None for m in a) < 40
        assert sum(m is not None for m in run(1, max_faults=3)) == 3
        capped = run(1, max_faults_per_request=1)
        assert 0 < sum(m is not None for m in capped) <= 10  # 10 distinct requests
    finally:
        target.shutdown()
        target.server_close()
