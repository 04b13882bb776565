"""A real S3-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

:class:`S3Server` runs moto's S3 implementation in *server mode* (a werkzeug
WSGI server speaking real HTTP) on ``127.0.0.1`` with a kernel-chosen free port.
Code under test talks to it through s3fs/aiobotocore exactly as a user's code
talks to AWS: nothing in s3fs or botocore is patched.

Two modes:

* ``mode="subprocess"`` (default): the server runs in a child Python process
  (``python tests/support/s3.py --serve``). It does not compete for the GIL with
  the code under test (which matters for benchmarks and for thread-heavy DCP
  code), and its state cannot be wiped by an in-process ``moto.mock_aws``. The
  child exits by itself if the parent dies (it watches its stdin pipe).
* ``mode="thread"``: the same server in a daemon thread of this process (what
  ``moto.server.ThreadedMotoServer`` does). Slightly faster to start.

Typical use::

    from tests.support.s3 import S3Server
    import fsspec

    with S3Server() as server:
        server.create_bucket("ckpt")
        fs, _ = fsspec.url_to_fs("s3://ckpt", **server.storage_options())
        fs.pipe("ckpt/a.bin", b"hello")

The storage options pin everything that could otherwise leak in from the
environment: explicit endpoint, credentials and region (so ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_DEFAULT_REGION`` ... are irrelevant) and
``config_kwargs={"proxies": {}}`` (botocore would otherwise route requests to
127.0.0.1 through ``HTTP_PROXY``/``HTTPS_PROXY`` unless ``NO_PROXY`` covers it).
The server process itself gets an environment without proxy/AWS variables.
``AWS_PROFILE`` naming a missing profile still breaks botocore session creation
(not a server problem); use :func:`clean_aws_env` if a test must be immune.

This module must stay importable without pytest (benchmarks import it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

DEFAULT_KEY = "testing"
DEFAULT_SECRET = "testing"
DEFAULT_REGION = "us-east-1"

# Environment variables that could make botocore / the server talk to something
# other than 127.0.0.1 or pick other credentials.
_PROXY_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)

__all__ = ["S3Server", "clean_aws_env", "make_storage_options", "unique_bucket_name"]


def unique_bucket_name(prefix: str = "test") -> str:
    """A valid, unique S3 bucket name (lower case, <= 63 chars)."""
    prefix = "".join(c if c.isalnum() or c == "-" else "-" for c in prefix.lower())[:40]
    return f"{prefix}-{uuid.uuid4().hex[:16]}".strip("-")


def _child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _PROXY_ENV and not k.startswith("AWS_") and not k.startswith("MOTO_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def clean_aws_env() -> Iterator[None]:
    """Temporarily remove proxy and AWS_* variables from ``os.environ``."""
    saved = {
        k: os.environ.pop(k) for k in list(os.environ) if k in _PROXY_ENV or k.startswith("AWS_")
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def _make_wsgi_server(host: str, port: int):
    """Build (but do not start) a threaded werkzeug server running moto."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class _QuietHandler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            # werkzeug writes headers and body separately; without NODELAY a
            # small body waits for the client's delayed ACK (~40 ms).
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            pass

        def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
    server.daemon_threads = True
    return server


def _serve_child() -> None:
    """Entry point of the child process: bind, report the port, serve."""
    server = _make_wsgi_server("127.0.0.1", 0)

    def _watch_parent() -> None:
        # EOF on stdin means the parent closed the pipe or died.
        try:
            sys.stdin.buffer.read()
        finally:
            os._exit(0)

    threading.Thread(target=_watch_parent, daemon=True).start()
    sys.stdout.write(json.dumps({"port": server.server_address[1]}) + "\n")
    sys.stdout.flush()
    server.serve_forever(poll_interval=0.1)


class S3Server:
    """moto S3 in server mode on 127.0.0.1; a context manager.

    Parameters
    ----------
    mode:
        ``"subprocess"`` (default) or ``"thread"``.
    startup_timeout:
        Seconds to wait for the server to accept connections.
    """

    def __init__(self, mode: str = "subprocess", startup_timeout: float = 60.0) -> None:
        if mode not in ("subprocess", "thread"):
            raise ValueError(f"mode must be 'subprocess' or 'thread', not {mode!r}")
        self.mode = mode
        self.startup_timeout = startup_timeout
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.key = DEFAULT_KEY
        self.secret = DEFAULT_SECRET
        self.region = DEFAULT_REGION
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle
    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("S3Server is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        if self.mode == "subprocess":
            return self._proc is not None and self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> S3Server:
        if self.port is not None:
            raise RuntimeError("S3Server already started")
        t0 = time.perf_counter()
        if self.mode == "thread":
            self._start_thread()
        else:
            self._start_subprocess()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - t0
        return self

    def _start_thread(self) -> None:
        self._server = _make_wsgi_server(self.host, 0)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"moto-s3-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _start_subprocess(self) -> None:
        self._log = tempfile.TemporaryFile(prefix="moto-s3-", suffix=".log")
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_child_env(),
            cwd=tempfile.gettempdir(),
            close_fds=True,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stop()
                    raise TimeoutError(
                        f"moto server did not start within {self.startup_timeout}s\n{self._log_tail()}"
                    )
                if not sel.select(timeout=min(remaining, 1.0)):
                    if self._proc.poll() is not None:
                        break
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        try:
            self.port = int(json.loads(line.decode())["port"])
        except (ValueError, KeyError) as e:
            tail = self._log_tail()
            self.stop()
            raise RuntimeError(f"moto server failed to start: {line!r}\n{tail}") from e

    def _wait_ready(self, t0: float) -> None:
        """Poll until a real HTTP request is answered (bounded in time)."""
        deadline = t0 + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last: Exception | None = None
        delay = 0.005
        while time.perf_counter() < deadline:
            if not self.running:
                raise RuntimeError(f"moto server exited during start-up\n{self._log_tail()}")
            try:
                with opener.open(f"{self.endpoint_url}/moto-api/data.json", timeout=5) as r:
                    r.read()
                return
            except OSError as e:  # URLError is an OSError
                last = e
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        raise TimeoutError(f"moto server not ready after {self.startup_timeout}s: {last}")

    def _log_tail(self, n: int = 4000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-n:]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        """Stop the server; idempotent, bounded in time."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self._server is not None:
            self._server.shutdown()  # returns within poll_interval
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        self.port = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last-resort cleanup of the child process
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()

    # ------------------------------------------------------------------ client side
    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs options a user would pass to reach this server.

        ``extra`` is merged on top; ``client_kwargs`` and ``config_kwargs`` are
        merged key-wise (so ``config_kwargs={"retries": ...}`` keeps
        ``proxies={}``).
        """
        return make_storage_options(
            self.endpoint_url,
            key=self.key,
            secret=self.secret,
            region=self.region,
            **extra,
        )

    def filesystem(self, **extra: Any):
        """A fresh (uncached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        opts = self.storage_options(**extra)
        opts.setdefault("skip_instance_cache", True)
        return s3fs.S3FileSystem(**opts)

    def client(self):
        """A synchronous botocore S3 client for setup/inspection (cached)."""
        with self._lock:
            if self._client is None:
                import botocore.config
                import botocore.session

                session = botocore.session.Session()
                self._client = session.create_client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=self.key,
                    aws_secret_access_key=self.secret,
                    config=botocore.config.Config(
                        proxies={},
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=5,
                        read_timeout=30,
                    ),
                )
            return self._client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if ``name`` is None); returns its name."""
        name = name or unique_bucket_name()
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket with all its objects and pending multipart uploads.

        Best effort (errors are ignored); frees the server's memory.
        """
        if not self.running:
            return
        c = self.client()
        with contextlib.suppress(Exception):
            for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                for u in page.get("Uploads", []):
                    c.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
        with contextlib.suppress(Exception):
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        with contextlib.suppress(Exception):
            c.delete_bucket(Bucket=name)

    def reset(self) -> None:
        """Drop all buckets and objects (moto's reset API)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with opener.open(req, timeout=10) as r:
            r.read()


def make_storage_options(
    endpoint_url: str,
    *,
    key: str = DEFAULT_KEY,
    secret: str = DEFAULT_SECRET,
    region: str = DEFAULT_REGION,
    **extra: Any,
) -> dict[str, Any]:
    """s3fs storage options for an S3-compatible endpoint (e.g. a FaultProxy)."""
    opts: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "key": key,
        "secret": secret,
        "client_kwargs": {"region_name": region},
        "config_kwargs": {"proxies": {}},
    }
    for k, v in copy.deepcopy(extra).items():
        if k in ("client_kwargs", "config_kwargs") and isinstance(v, dict):
            opts[k] = {**opts[k], **v}
        else:
            opts[k] = v
    return opts


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve_child()
