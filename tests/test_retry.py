"""Retries of storage operations (torch_ucp.storage.retry): what is transient, and the loop.

The errors are real: sockets refused, reset and timed out on 127.0.0.1, aiohttp's and
botocore's own exception types built as their libraries raise them, fsspec's timeout, OSErrors
of the errnos the module names. The retry loop runs with its knobs set small
(``TORCH_UCP_RETRY_*``); the backoff is read from the warnings it logs, whose arguments carry
each delay.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import sys
import time

import aiohttp
import botocore.exceptions
import fsspec.exceptions
import pytest

from torch_ucp.errors import CorruptCheckpointError
from torch_ucp.storage.retry import error_code, is_transient, is_unreachable, retry


# -- real errors ------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused() -> ConnectionRefusedError:
    try:
        socket.create_connection(("127.0.0.1", _closed_port()), timeout=5).close()
    except ConnectionRefusedError as e:
        return e
    raise AssertionError("a closed port accepted a connection")


def reset() -> ConnectionResetError:
    """The peer aborts the connection (RST) while we read."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            peer, _ = server.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            try:
                client.recv(1)
            except ConnectionResetError as e:
                return e
    raise AssertionError("no reset")


def timed_out() -> TimeoutError:
    """A read from a peer that never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=0.01) as client:
            try:
                client.recv(1)
            except TimeoutError as e:  # socket.timeout is TimeoutError since Python 3.10
                return e
    raise AssertionError("no timeout")


def aiohttp_refused() -> aiohttp.ClientConnectorError:
    async def get():
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{_closed_port()}/bucket/key")

    try:
        asyncio.run(get())
    except aiohttp.ClientConnectorError as e:
        return e
    raise AssertionError("a closed port answered")


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, "GetObject")


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` raised ``from cause``, as a wrapping layer (s3fs, fsspec) raises it."""
    try:
        raise outer from cause
    except BaseException as e:  # noqa: BLE001
        return e


TRANSIENT = {
    "connection-reset": reset,
    "socket-timeout": timed_out,
    "os-timeout": lambda: OSError(errno.ETIMEDOUT, "Connection timed out"),
    "ebusy": lambda: OSError(errno.EBUSY, "Device or resource busy"),
    "eagain": lambda: BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
    "eremoteio": lambda: OSError(errno.EREMOTEIO, "Remote I/O error"),
    "s3-slowdown": lambda: client_error("SlowDown", 503),
    "s3-internal": lambda: client_error("InternalError", 500),
    "s3-throttling": lambda: client_error("ThrottlingException", 400),
    "bare-503": lambda: client_error("", 503),
    "s3-error-wrapped": lambda: chained(OSError("s3fs failed"), client_error("SlowDown", 503)),
    "botocore-read-timeout": lambda: botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"),
    "botocore-closed": lambda: botocore.exceptions.ConnectionClosedError(endpoint_url="http://s3"),
    "aiohttp-disconnected": lambda: aiohttp.ServerDisconnectedError(),
    "aiohttp-payload-cut": lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
    "fsspec-timeout": lambda: fsspec.exceptions.FSTimeoutError(),
    "dns-try-again": lambda: socket.gaierror(
        socket.EAI_AGAIN, "Temporary failure in name resolution"
    ),
    "aiohttp-dns-try-again": lambda: aiohttp.ClientConnectorDNSError(
        None, socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    ),
}
PERMANENT = {
    "refused": refused,
    "aiohttp-refused": aiohttp_refused,
    "botocore-endpoint-refused": lambda: chained(
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), refused()
    ),
    "unknown-host": lambda: socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    "aiohttp-unknown-host": lambda: aiohttp.ClientConnectorDNSError(
        None, socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    ),
    "missing": lambda: FileNotFoundError(errno.ENOENT, "No such file or directory", "/ckpt/x"),
    "denied": lambda: PermissionError(errno.EACCES, "Permission denied", "/ckpt/x"),
    "disk-full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "s3-no-such-key": lambda: client_error("NoSuchKey", 404),
    "s3-access-denied": lambda: client_error("AccessDenied", 403),
    "s3-precondition": lambda: client_error("PreconditionFailed", 412),
    "checkpoint-error": lambda: CorruptCheckpointError("checksum mismatch"),
    # A checkpoint error stays final whatever transient error it reports.
    "checkpoint-error-over-reset": lambda: chained(CorruptCheckpointError("bad bytes"), reset()),
    "missing-under-timeout": lambda: chained(FileNotFoundError("x"), TimeoutError()),
    "value-error": lambda: ValueError("bad argument"),
    # What s3fs makes of a code it does not translate: OSError EIO caused by the ClientError.
    "s3fs-untranslated": lambda: chained(
        OSError(errno.EIO, "InvalidArgument"), client_error("InvalidArgument", 400)
    ),
}


@pytest.mark.parametrize("name", list(TRANSIENT))
def test_transient_errors(name):
    exc = TRANSIENT[name]()
    assert is_transient(exc), repr(exc)
    assert not is_unreachable(exc)


@pytest.mark.parametrize("name", list(PERMANENT))
def test_permanent_errors(name):
    assert not is_transient(PERMANENT[name]()), name


def test_unreachable_endpoints_are_recognized_through_wrappers():
    assert is_unreachable(refused()) and is_unreachable(aiohttp_refused())
    assert is_unreachable(chained(OSError("wrapped"), refused()))
    assert not is_unreachable(reset()) and not is_unreachable(timed_out())


def test_error_code_reads_the_store_response_through_wrappers():
    assert error_code(client_error("InvalidRange", 416)) == "InvalidRange"
    assert error_code(client_error("", 503)) == "503"
    assert (
        error_code(chained(OSError("s3fs"), client_error("PreconditionFailed", 412)))
        == "PreconditionFailed"
    )
    assert error_code(ValueError("x")) is None


# -- the loop ---------------------------------------------------------------------------------
BASE, CAP = 0.004, 0.01


@pytest.fixture
def small_knobs(monkeypatch):
    monkeypatch.setenv("TORCH_UCP_RETRY_ATTEMPTS", "5")
    monkeypatch.setenv("TORCH_UCP_RETRY_DEADLINE", "60")
    monkeypatch.setenv("TORCH_UCP_RETRY_BASE_DELAY", str(BASE))
    monkeypatch.setenv("TORCH_UCP_RETRY_MAX_DELAY", str(CAP))


class Flaky:
    """Raises the given errors in turn (a factory each), then returns ``"data"``."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = 0
        self.cleanups = 0
        self.times: list[float] = []  # when each call started (time.monotonic)

    def __call__(self):
        self.calls += 1
        self.times.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)()
        return "data"

    def cleanup(self):
        self.cleanups += 1


def retry_delays(caplog) -> list[float]:
    records = [r for r in caplog.records if r.name == "torch_ucp.storage.retry"]
    return [r.args[-1] for r in records]


def notes(exc: BaseException) -> list[str]:
    return getattr(exc, "__notes__", [])


def test_transient_errors_are_retried_until_one_succeeds(small_knobs, caplog):
    caplog.set_level(logging.WARNING, "torch_ucp.storage.retry")
    fn = Flaky(
        TRANSIENT["connection-reset"], TRANSIENT["s3-slowdown"], TRANSIENT["aiohttp-payload-cut"]
    )
    assert retry(fn, "reading model.w in s3://b/ckpt/d0.bin", on_retry=fn.cleanup) == "data"
    assert fn.calls == 4 and fn.cleanups == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all(
        "reading model.w in s3://b/ckpt/d0.bin failed" in m for m in messages
    )
    assert "ConnectionResetError" in messages[0] and "retry 1/4" in messages[0]
    assert "ClientError" in messages[1] and "ClientPayloadError" in messages[2]


def test_backoff_is_full_jitter_exponential_and_capped(small_knobs, caplog):
    caplog.set_level(logging.WARNING, "torch_ucp.storage.retry")
    errors = [TRANSIENT["os-timeout"]] * 11
    fn = Flaky(*errors)
    assert retry(fn, "writing d0.bin", attempts=12) == "data"
    delays = retry_delays(caplog)
    assert len(delays) == 11 and fn.calls == 12
    for i, delay in enumerate(delays):
        assert 0.0 <= delay <= min(CAP, BASE * 2**i), (i, delay)
    assert max(delays) > 0.0  # jitter, not a constant zero


def test_transient_errors_give_up_after_the_attempts_naming_the_operation(small_knobs):
    fn = Flaky(*[TRANSIENT["s3-internal"]] * 10)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        retry(fn, "committing s3://b/ckpt/.metadata", on_retry=fn.cleanup)
    assert fn.calls == 5 and fn.cleanups == 4  # the knob's 5 attempts
    assert error_code(e.value) == "InternalError"  # the last error itself, not a wrapper
    if sys.version_info >= (3, 11):  # exception notes
        assert notes(e.value) == [
            "torch_ucp: committing s3://b/ckpt/.metadata failed after 5 attempts"
        ]

    fn = Flaky(*[TRANSIENT["fsspec-timeout"]] * 10)
    with pytest.raises(fsspec.exceptions.FSTimeoutError):
        retry(fn, "reading x", attempts=2)
    assert fn.calls == 2


@pytest.mark.parametrize(
    "name",
    ["missing", "denied", "refused", "s3-no-such-key", "s3fs-untranslated", "checkpoint-error"],
)
def test_permanent_errors_are_raised_at_once(small_knobs, caplog, name):
    caplog.set_level(logging.WARNING, "torch_ucp.storage.retry")
    fn = Flaky(PERMANENT[name], TRANSIENT["ebusy"])
    with pytest.raises(Exception) as e:
        retry(fn, "reading y", on_retry=fn.cleanup)
    assert not is_transient(e.value)
    assert fn.calls == 1 and fn.cleanups == 0 and not caplog.records
    assert notes(e.value) == []  # one attempt: the error as it came


def test_a_permanent_error_after_retries_ends_them_naming_the_operation(small_knobs):
    fn = Flaky(TRANSIENT["connection-reset"], TRANSIENT["ebusy"], PERMANENT["missing"])
    with pytest.raises(FileNotFoundError) as e:
        retry(fn, "reading shard 3 of s3://b/ckpt")
    assert fn.calls == 3
    if sys.version_info >= (3, 11):
        assert notes(e.value) == [
            "torch_ucp: reading shard 3 of s3://b/ckpt failed after 3 attempts"
        ]


def test_no_new_attempt_after_the_deadline(small_knobs, monkeypatch):
    monkeypatch.setenv("TORCH_UCP_RETRY_BASE_DELAY", "0.01")
    monkeypatch.setenv("TORCH_UCP_RETRY_MAX_DELAY", "0.01")
    fn = Flaky(*[TRANSIENT["aiohttp-disconnected"]] * 10_000)
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        retry(fn, "reading z", attempts=10_000, deadline_seconds=0.2)
    elapsed = time.monotonic() - started
    assert fn.calls < 10_000  # the deadline ended it, not the attempts
    assert elapsed >= 0.2  # it gave up only once the deadline had passed
    # The sleep before an attempt ends at the deadline, so at most the attempt that was due
    # then starts after it (late only by scheduling); none starts after one that failed late.
    assert sum(t >= fn.times[0] + 0.2 for t in fn.times) <= 1  # (its deadline: before times[0])


def test_the_deadline_knob_is_used_when_not_given(small_knobs, monkeypatch):
    monkeypatch.setenv("TORCH_UCP_RETRY_DEADLINE", "0.05")
    monkeypatch.setenv("TORCH_UCP_RETRY_ATTEMPTS", "10000")
    fn = Flaky(*[TRANSIENT["eagain"]] * 10_000)
    started = time.monotonic()
    with pytest.raises(BlockingIOError):
        retry(fn, "listing")
    assert fn.calls < 10_000 and time.monotonic() - started >= 0.05


def test_success_at_first_is_one_call(small_knobs, caplog):
    fn = Flaky()
    assert retry(fn, "reading") == "data" and fn.calls == 1 and not caplog.records
