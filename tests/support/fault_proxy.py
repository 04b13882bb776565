"""Fault-injecting HTTP proxy for S3 tests.

:class:`FaultProxy` listens on 127.0.0.1, forwards every request to a real S3
server (normally :class:`tests.support.s3.S3Server`) and, deterministically from
``seed``, injects a fault into a fraction of them. Point s3fs at
``proxy.endpoint_url`` instead of the server's::

    from tests.support.s3 import S3Server
    from tests.support.fault_proxy import FaultProxy, RETRY_STORAGE_OPTIONS

    with S3Server() as server, FaultProxy(server.endpoint_url, fail_rate=0.2, seed=1) as px:
        bucket = server.create_bucket()
        fs = fsspec.filesystem("s3", **px.storage_options(**RETRY_STORAGE_OPTIONS))
        fs.pipe(f"{bucket}/k", b"data")        # succeeds despite the faults
        assert px.failed > 0, px.stats()

Fault kinds (``modes``)
-----------------------
``"503"``        503 SlowDown with an S3 XML error body (request not forwarded).
``"500"``        500 InternalError, likewise.
``"403"``        403 AccessDenied, likewise (a *permanent* error; not in the defaults).
``"drop"``       connection closed (FIN) after reading the request, no response,
                 request not forwarded.
``"drop_after"`` request forwarded and executed by the server, then the
                 connection is closed without a response (the client cannot know
                 the operation happened; retries must be idempotent).
``"reset"``      request forwarded; status line + headers + half the body are
                 sent, then the connection is reset (RST). With an empty body
                 (HEAD, PUT, UploadPart responses) half the header block is sent.
``"truncate"``   like ``reset`` but with a clean close (FIN) mid-body.
``"slow"``       response delayed by ``slow_seconds`` (a fault only if the
                 client's ``read_timeout`` is shorter).

Bandwidth limit
---------------
``bandwidth`` (bytes/s, None: unlimited) caps the aggregate rate of response
bodies over all connections, like a store whose throughput is the limit
(per-node NIC, per-prefix throughput): a token bucket shared by the handler
threads, refilled at ``bandwidth`` and holding at most ``bandwidth_burst``
seconds of credit, that every body chunk (64 KiB) waits on before it is sent.
Waiting is a sleep, so the throttle costs no CPU. Request bodies and headers
are not throttled. Independent of the faults (``fail_rate=0`` for a plain
throttle)::

    FaultProxy(server.endpoint_url, fail_rate=0.0, bandwidth=100e6)  # 100 MB/s

Counters: ``requests``, ``forwarded``, ``failed`` (faults injected),
``faults`` (by mode), ``connections``; ``stats()`` gives them all, ``log`` the
decision for every request.

Which options make s3fs survive these faults (measured: s3fs 2026.9.0,
aiobotocore 3.10.0, botocore 1.43.117, aiohttp, moto 5.2.1)
------------------------------------------------------------------------------
Three layers retry, each a different set of failures:

1. **botocore** (``config_kwargs={"retries": {...}}``) retries one HTTP request
   that failed before botocore had the whole response: 500/502/503/504
   (SlowDown, InternalError, ...), connection dropped or reset
   (``ConnectionClosedError``, ``EndpointConnectionError``), timeouts
   (``ReadTimeoutError``, ``ConnectTimeoutError``), and truncated bodies of the
   responses botocore parses itself (HEAD, PUT, UploadPart, Create/Complete
   MultipartUpload, ListObjectsV2, DeleteObjects). It never retries 4xx
   (403/404/416 are sent once), and it does NOT cover the body of GetObject,
   which s3fs streams after botocore has returned. Careful:
   ``{"max_attempts": N}`` in the Config dict means N *retries* (N+1 requests);
   ``{"total_max_attempts": N}`` means N requests. Standard-mode backoff is
   ``random() * min(2**(attempt-1), 20)`` s (mean 0.5, 1, 2, 4 s ...), and a
   per-client retry quota (500 tokens, 5-14 per retry) can run dry after a long
   run of failures ("RetryQuotaReached"). Without configuration botocore uses
   legacy mode with 5 attempts, unless AWS_RETRY_MODE / AWS_MAX_ATTEMPTS /
   ~/.aws/config (or the opt-in AWS_NEW_RETRIES_2026) say otherwise.
2. **s3fs** (``S3FileSystem.retries``, class attribute, default 5, backoff
   0.1*1.7**i s) retries, around every botocore call and around
   ``_call_and_read`` of ``cat_file``/``cat_ranges``/``open(...).read()``:
   ``TimeoutError``, ``botocore.exceptions.HTTPClientError`` (hence
   ``ConnectionClosedError``, ``ReadTimeoutError``),
   ``aiohttp.ClientPayloadError`` (GET body cut mid-way),
   ``urllib3.exceptions.IncompleteRead``, ``fsspec.exceptions.FSTimeoutError``,
   ``botocore.parsers.ResponseParserError``, and ClientErrors whose text contains
   "SlowDown" / "reduce your request rate". It does NOT retry
   ``EndpointConnectionError`` (reset before the response headers, connection
   refused), ``ConnectTimeoutError``, 500 InternalError, nor a 503 on HEAD
   (a HEAD error has no body, so the "SlowDown" text is absent).
   ``retries`` is *not* a constructor option: ``S3FileSystem(retries=3)`` fails
   with ``TypeError: AioSession.__init__() got an unexpected keyword argument
   'retries'``; set ``fs.retries = n`` on the instance instead.
3. **aiohttp** transparently re-sends an idempotent request (GET/HEAD/PUT/DELETE)
   once when a reused keep-alive connection is closed/reset before a response.

Use both 1 and 2: :data:`RETRY_STORAGE_OPTIONS` (botocore standard mode, 5
requests per call, bounded timeouts) plus s3fs's default ``retries = 5``. With
them s3fs survives 503, 500, drop, drop_after, reset and truncate (and slow
responses shorter than ``read_timeout``) at fail_rate 0.2 (checked for seeds
0-9, and at 0.4) for: put (pipe, also concurrent), get (cat_file, cat of many
paths), ranged get (cat_ranges, open+read), multipart upload via
``open("wb")`` (create, each part, complete), ls, info, rm.

Not survived even with those options (torch_ucp must handle):

* **GET body cut mid-way in ``cat_file`` of a whole object larger than
  ``chunksize``/``default_block_size`` (50 MiB)**: s3fs then reads concurrent
  ranges (``_cat_file_concurrent``) without any retry around the body read; one
  reset/truncate raises ``aiohttp.client_exceptions.ClientPayloadError``. Read
  big objects with explicit ranges (``cat_file(path, start, end)`` or
  ``cat_ranges``), which s3fs does retry, or retry the whole operation.
* ``fs.cat_ranges`` defaults to ``on_error="return"``: a failed range comes back
  as an exception object *inside the result list*. Pass ``on_error="raise"``.
* A multipart upload through ``fs.open(path, "wb")`` whose part or complete
  call finally fails is NOT aborted: the upload stays pending (orphaned parts)
  and the object is not created. Retry the whole file write, and abort stale
  uploads (``list_multipart_uploads`` / ``abort_multipart_upload``).
  (``pipe_file``/``put_file`` of large data do abort on failure.)
* Any fault that outlasts the retries. The layers multiply: with
  RETRY_STORAGE_OPTIONS and s3fs retries=5 a persistent 503 on one GET or PUT
  costs 25 requests and ~35 s, a persistent drop on a PUT 50 requests and
  ~40 s, on a ranged GET (s3fs nests two retry loops there) 250 requests and
  ~190 s. With s3fs retries=2 and total_max_attempts=3 a persistent drop on a
  GET costs 24 requests and ~7 s. A storage layer with its own outer retry
  should keep the inner layers small and bound the whole by a deadline.

What reaches the caller when retries are exhausted (or disabled)
---------------------------------------------------------------
(``exc.__cause__`` in brackets; s3fs translates botocore ``ClientError`` to
builtin exceptions via ``s3fs.errors.translate_boto_error`` and keeps the
ClientError as ``__cause__``; its ``.response["Error"]["Code"]`` and
``.response["ResponseMetadata"]["HTTPStatusCode"]`` are the reliable signals.)

Transient:

* 503 SlowDown: ``OSError`` errno ``EBUSY`` (16)
  [``botocore.exceptions.ClientError``, Code "SlowDown"; on HEAD Code "503"].
* 500 InternalError: ``OSError`` errno ``EREMOTEIO`` (121) [ClientError Code
  "InternalError"; on HEAD "500"].
* drop / drop_after (closed before any response), and truncate before the
  headers ended: ``botocore.exceptions.ConnectionClosedError``
  (an ``HTTPClientError``) [``aiohttp.client_exceptions.ServerDisconnectedError``].
* reset before the response headers were complete:
  ``botocore.exceptions.EndpointConnectionError`` (a
  ``botocore.exceptions.ConnectionError``) [``aiohttp.client_exceptions.ClientOSError``
  <- ``ConnectionResetError``].
* reset / truncate mid-body of a GetObject (cat_file, cat_ranges, open().read()):
  ``aiohttp.client_exceptions.ClientPayloadError`` (not wrapped by botocore)
  [``aiohttp.http_exceptions.ContentLengthError``]; mid-body of any other
  response: ``botocore.exceptions.ConnectionClosedError``
  [``aiohttp.client_exceptions.ClientPayloadError``].
* slow beyond read_timeout: ``botocore.exceptions.ReadTimeoutError`` (an
  ``HTTPClientError``) [``aiohttp.client_exceptions.SocketTimeoutError``];
  connect timeout: ``botocore.exceptions.ConnectTimeoutError``.
* Generally transient: ``botocore.exceptions.HTTPClientError``,
  ``botocore.exceptions.ConnectionError``, ``aiohttp.ClientError``,
  ``TimeoutError``/``asyncio.TimeoutError``, ``fsspec.exceptions.FSTimeoutError``,
  ``urllib3.exceptions.IncompleteRead``, ``botocore.parsers.ResponseParserError``,
  and OSError whose ClientError cause has code SlowDown, ServiceUnavailable,
  InternalError, RequestTimeout, Throttling* or status 500/502/503/504.

Permanent (never retried by botocore):

* missing key: ``FileNotFoundError`` (from cat/info/open: raised by s3fs itself,
  no cause; from cat_ranges: [``botocore.errorfactory.NoSuchKey``]).
* missing bucket: ``FileNotFoundError`` [``botocore.errorfactory.NoSuchBucket``].
* 403 AccessDenied: ``PermissionError`` [ClientError Code "AccessDenied", or
  "403" on HEAD].
* range past the end: ``OSError`` errno ``EINVAL`` [ClientError "InvalidRange"].

Note that ``FileNotFoundError``, ``PermissionError`` and ``ConnectionResetError``
are all ``OSError`` subclasses: test the specific classes before ``OSError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any

__all__ = [
    "FAULT_MODES",
    "NO_RETRY_STORAGE_OPTIONS",
    "RETRY_STORAGE_OPTIONS",
    "FaultProxy",
    "RequestInfo",
]

#: s3fs storage options (merge into the endpoint/credential options) with which
#: s3fs survives the injected faults; keep s3fs's own ``retries`` (default 5).
RETRY_STORAGE_OPTIONS: dict[str, Any] = {
    "config_kwargs": {
        "retries": {"total_max_attempts": 5, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 30,
    },
}

#: botocore retries off (also set ``fs.retries = 1`` to switch s3fs's off):
#: every fault surfaces to the caller.
NO_RETRY_STORAGE_OPTIONS: dict[str, Any] = {
    "config_kwargs": {
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 30,
    },
}

#: Every fault kind the proxy can inject (see the module docstring).
FAULT_MODES = ("503", "500", "403", "drop", "drop_after", "reset", "truncate", "slow")

_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",
        "Content-Length",
    )
)

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>{rid}</RequestId><HostId>fault-proxy</HostId></Error>"
)
_ERRORS = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
}

_CHUNK = 64 * 1024
# Query parameters that differ between runs and must not influence decisions.
_VOLATILE_QUERY = frozenset({"uploadId", "X-Amz-Date", "X-Amz-Signature", "X-Amz-Credential"})


class RequestInfo:
    """What a ``match`` callable sees about a request."""

    __slots__ = ("method", "path", "query", "headers")

    def __init__(self, method: str, path: str, query: dict[str, list[str]], headers: Any):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers

    def __repr__(self) -> str:
        return f"RequestInfo({self.method} {self.path} {self.query})"


class _TokenBucket:
    """Aggregate rate limit shared by threads: :meth:`take` blocks until ``n`` bytes fit.

    A virtual clock: ``_next`` is when the bytes reserved so far are paid for at ``rate``; a
    take returns once that is at most ``burst`` seconds ahead of now (so an idle bucket holds
    at most ``burst`` seconds of credit). Reservations are made under the lock in arrival
    order, the waits happen outside it.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 0:
            raise ValueError(f"bandwidth must be > 0 and burst >= 0, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            wait = self._next - self.burst - now
        if wait > 0:
            time.sleep(wait)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class FaultProxy:
    """Threaded HTTP/1.1 proxy on 127.0.0.1 that injects faults.

    Parameters
    ----------
    target_url:
        ``http://127.0.0.1:PORT`` of the real server (e.g. ``S3Server.endpoint_url``).
    fail_rate:
        Probability (0..1) that an eligible request attempt gets a fault.
        Can be changed at any time (``proxy.fail_rate = 0``).
    modes:
        Fault kinds to draw from (subset of :data:`FAULT_MODES`).
    seed:
        Decisions are a pure function of ``(seed, request identity, attempt #)``
        where the identity is method + path + query (minus volatile parameters
        such as ``uploadId``) + ``Range``; the n-th attempt of the same request
        gets the same decision in every run, whatever the interleaving of
        concurrent requests (only ``max_faults`` depends on arrival order).
    max_faults:
        Stop injecting after this many faults in total (None: unlimited).
    max_faults_per_request:
        At most this many faults for the same request identity (None: unlimited);
        e.g. 2 guarantees the third attempt goes through.
    methods:
        Only requests with these HTTP methods are eligible (None: all).
    match:
        Optional predicate ``match(RequestInfo) -> bool`` restricting eligibility.
    slow_seconds:
        Delay used by the ``"slow"`` mode.
    upstream_timeout, idle_timeout:
        Socket timeouts towards the server and for idle client connections.
    bandwidth:
        Aggregate limit on response-body bytes per second over all connections
        (None: unlimited); see "Bandwidth limit" in the module docstring.
    bandwidth_burst:
        Seconds of idle credit the bandwidth limit may spend at once.

    ``fail_rate``, ``modes``, ``methods``, ``match``, ``max_faults``,
    ``max_faults_per_request`` and ``slow_seconds`` are plain attributes and may
    be changed while the proxy runs (e.g. ``fail_rate = 0`` during set-up).
    Request bodies are buffered in memory before forwarding; response bodies
    are streamed. Only loopback targets are accepted.
    """

    def __init__(
        self,
        target_url: str,
        fail_rate: float = 0.2,
        modes: Iterable[str] = ("503", "drop", "reset"),
        seed: int = 0,
        max_faults: int | None = None,
        *,
        max_faults_per_request: int | None = None,
        methods: Iterable[str] | None = None,
        match: Callable[[RequestInfo], bool] | None = None,
        slow_seconds: float = 0.5,
        upstream_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        bandwidth: float | None = None,
        bandwidth_burst: float = 0.05,
    ) -> None:
        parsed = urllib.parse.urlsplit(target_url)
        if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"target_url must be http://127.0.0.1:PORT, got {target_url!r}")
        self.modes = tuple(modes)
        bad = set(self.modes) - set(FAULT_MODES)
        if bad or not self.modes:
            raise ValueError(f"unknown fault modes {sorted(bad)}; choose from {FAULT_MODES}")
        self.target_host = parsed.hostname
        self.target_port = parsed.port or 80
        self.target_url = target_url.rstrip("/")
        self.fail_rate = float(fail_rate)
        self.seed = seed
        self.max_faults = max_faults
        self.max_faults_per_request = max_faults_per_request
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self.match = match
        self.slow_seconds = slow_seconds
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout
        self._bucket = None if bandwidth is None else _TokenBucket(float(bandwidth), bandwidth_burst)

        self._lock = threading.Lock()
        self._attempts: Counter[str] = Counter()
        self._faults_per_key: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._requests = 0
        self._forwarded = 0
        self._connections = 0
        self._get_bytes = 0
        self._log: list[tuple[str, str, str | None]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # ------------------------------------------------------------------ life cycle
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        return self._server.server_address[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    url = endpoint_url

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs options that reach the target server through this proxy.

        Uses the default test credentials of :mod:`tests.support.s3`;
        ``extra`` is merged as in :func:`tests.support.s3.make_storage_options`
        (nested dicts such as ``config_kwargs`` are merged one level deep).
        """
        from .s3 import make_storage_options

        return make_storage_options(self.endpoint_url, **extra)

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        Handler.timeout = self.idle_timeout
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fault-proxy-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # unblock handler threads waiting on keep-alive sockets
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ counters
    @property
    def requests(self) -> int:
        """Requests received from clients."""
        return self._requests

    @property
    def connections(self) -> int:
        """Client connections accepted (keep-alive reuses one for many requests)."""
        return self._connections

    @property
    def forwarded(self) -> int:
        """Requests that reached the target server (incl. drop_after/reset/truncate/slow)."""
        return self._forwarded

    @property
    def failed(self) -> int:
        """Faults injected (all modes, including ``slow``)."""
        with self._lock:
            return sum(self._faults.values())

    @property
    def faults(self) -> dict[str, int]:
        """Faults injected, by mode."""
        with self._lock:
            return dict(self._faults)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "connections": self._connections,
                "requests": self._requests,
                "forwarded": self._forwarded,
                "failed": sum(self._faults.values()),
                "faults": dict(self._faults),
                "get_bytes": self._get_bytes,
            }

    @property
    def log(self) -> list[tuple[str, str, str | None]]:
        """``(method, request identity, fault mode or None)`` for every request."""
        with self._lock:
            return list(self._log)

    def reset_stats(self) -> None:
        with self._lock:
            self._faults.clear()
            self._requests = 0
            self._forwarded = 0
            self._connections = 0
            self._get_bytes = 0
            self._log.clear()

    # ------------------------------------------------------------------ decisions
    def _decide(self, method: str, target: str, headers: Any) -> str | None:
        split = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        stable_query = sorted(
            (k, v) for k, vs in query.items() for v in vs if k not in _VOLATILE_QUERY
        )
        ident = f"{method} {split.path}?{urllib.parse.urlencode(stable_query)} {headers.get('Range', '')}"
        eligible = (self.methods is None or method in self.methods) and (
            self.match is None or self.match(RequestInfo(method, split.path, query, headers))
        )
        with self._lock:
            self._requests += 1
            attempt = self._attempts[ident]
            self._attempts[ident] += 1
            mode = None
            if eligible and self.fail_rate > 0:
                h = hashlib.blake2b(f"{self.seed}\0{ident}\0{attempt}".encode(), digest_size=16)
                d = h.digest()
                u = int.from_bytes(d[:8], "big") / 2**64
                if (
                    u < self.fail_rate
                    and (self.max_faults is None or sum(self._faults.values()) < self.max_faults)
                    and (
                        self.max_faults_per_request is None
                        or self._faults_per_key[ident] < self.max_faults_per_request
                    )
                ):
                    mode = self.modes[int.from_bytes(d[8:], "big") % len(self.modes)]
                    self._faults[mode] += 1
                    self._faults_per_key[ident] += 1
            self._log.append((method, ident, mode))
        return mode

    def _count_forwarded(self) -> None:
        with self._lock:
            self._forwarded += 1

    def _count_get_bytes(self, n: int) -> None:
        with self._lock:
            self._get_bytes += n

    @property
    def get_bytes(self) -> int:
        """Body bytes of GET responses relayed in full to clients (what readers fetched)."""
        with self._lock:
            return self._get_bytes


class _UpstreamError(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy
    timeout = 60.0

    def setup(self) -> None:
        super().setup()
        # Small writes (headers, then body) must not wait for delayed ACKs.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream: http.client.HTTPConnection | None = None
        with self.proxy._lock:
            self.proxy._conns.add(self.connection)
            self.proxy._connections += 1

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()
        with self.proxy._lock:
            self.proxy._conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def handle(self) -> None:
        self.close_connection = True
        try:
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()
        except (OSError, ValueError):
            # client went away, idle timeout, or we cut the connection on purpose
            self.close_connection = True

    # -------------------------------------------------------------- request body
    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed during chunked body")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers until blank line
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                parts.append(self._read_exact(size))
                self.rfile.readline(3)  # CRLF after chunk
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self._read_exact(length)

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.rfile.read(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("client closed during body")
            buf += chunk
        return bytes(buf)

    # -------------------------------------------------------------- raw output
    def _send(self, data: bytes) -> None:
        self.connection.sendall(data)

    def _send_body(self, data: bytes, body_bytes: int, head: bytes = b"") -> None:
        """Send ``head + data`` once ``body_bytes`` of response body fit the bandwidth limit."""
        if self.proxy._bucket is not None and body_bytes:
            self.proxy._bucket.take(body_bytes)
        self._send(head + data)

    def _abort(self, rst: bool) -> None:
        """Close the client connection: FIN (rst=False) or RST (rst=True)."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        # The file objects hold references to the socket: close them too so
        # the descriptor is really closed now (that is what sends the RST).
        for f in (self.rfile, self.wfile):
            with contextlib.suppress(OSError, ValueError):
                f.close()
        with contextlib.suppress(OSError):
            sock.close()

    def _send_error_response(self, mode: str) -> None:
        status, reason, code, message = _ERRORS[mode]
        body = _ERROR_XML.format(code=code, message=message, rid=uuid.uuid4().hex).encode()
        if self.command == "HEAD":
            body = b""
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-amz-request-id: {uuid.uuid4().hex[:16].upper()}\r\n"
            "Connection: keep-alive\r\n\r\n"
        ).encode()
        self._send(head + body)

    # -------------------------------------------------------------- forwarding
    def _upstream_request(self, body: bytes) -> http.client.HTTPResponse:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        for attempt in range(2):
            fresh = self._upstream is None
            if fresh:
                conn = http.client.HTTPConnection(
                    self.proxy.target_host,
                    self.proxy.target_port,
                    timeout=self.proxy.upstream_timeout,
                )
                conn.connect()  # may raise OSError: the caller resets the client
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._upstream = conn
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders(body if body else None)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError) as e:
                conn.close()
                self._upstream = None
                if fresh or attempt == 1:
                    raise _UpstreamError(str(e)) from e
        raise AssertionError("unreachable")

    def _relay(self, resp: http.client.HTTPResponse, mode: str | None) -> None:
        length_hdr = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        chunked = not no_body and length_hdr is None
        lines = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
        for k, v in resp.getheaders():
            if k.lower() in _HOP_BY_HOP and not (k.lower() == "content-length" and not chunked):
                continue
            lines.append(f"{k}: {v}\r\n")
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("Connection: keep-alive\r\n\r\n")
        head = "".join(lines).encode("latin-1")

        if mode in ("reset", "truncate"):
            body_len = 0 if no_body else int(length_hdr or 0)
            if body_len > 0:
                cut = body_len // 2
                self._send(head)
                sent = 0
                while sent < cut:
                    chunk = resp.read(min(_CHUNK, cut - sent))
                    if not chunk:
                        break
                    self._send_body(chunk, len(chunk))
                    sent += len(chunk)
            else:
                self._send(head[: max(1, len(head) // 2)])
            resp.close()
            self._upstream_close()
            # Let the client consume what was sent, then cut the connection.
            time.sleep(0.05)
            self._abort(rst=(mode == "reset"))
            return

        if no_body:
            resp.read()
            self._send(head)
        elif chunked:
            self._send(head)
            while True:
                chunk = resp.read1(_CHUNK) if hasattr(resp, "read1") else resp.read(_CHUNK)
                if not chunk:
                    break
                self._send_body(b"%x\r\n%s\r\n" % (len(chunk), chunk), len(chunk))
                if self.command == "GET":
                    self.proxy._count_get_bytes(len(chunk))
            self._send(b"0\r\n\r\n")
        else:
            first = resp.read(_CHUNK)
            self._send_body(first, len(first), head)  # one segment for small responses
            sent = len(first)
            while first:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                self._send_body(chunk, len(chunk))
                sent += len(chunk)
            if self.command == "GET":
                self.proxy._count_get_bytes(sent)
        if resp.will_close:
            self._upstream_close()

    def _upstream_close(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _proxy(self) -> None:
        proxy = self.proxy
        try:
            body = self._read_body()
        except (ConnectionError, ValueError, OSError):
            self.close_connection = True
            return
        if self.headers.get("Connection", "").lower() == "close":
            self.close_connection = True

        mode = proxy._decide(self.command, self.path, self.headers)
        try:
            if mode in _ERRORS:
                self._send_error_response(mode)
                return
            if mode == "drop":
                self._abort(rst=False)
                return
            if mode == "slow":
                time.sleep(proxy.slow_seconds)
            try:
                resp = self._upstream_request(body)
            except (_UpstreamError, OSError, http.client.HTTPException):
                self._abort(rst=True)
                return
            proxy._count_forwarded()
            if mode == "drop_after":
                resp.read()
                resp.close()
                self._abort(rst=False)
                return
            self._relay(resp, mode)
        except OSError:
            # client went away (or we cut it): nothing more to do on this connection
            self.close_connection = True
            self._upstream_close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _proxy
