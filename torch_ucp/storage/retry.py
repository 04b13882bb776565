"""Bounded retries with exponential backoff and full jitter for transient storage errors.

Object stores fail transiently (HTTP 500/503 SlowDown, throttling, connections dropped or reset
mid-body, timeouts); s3fs and botocore retry some of these themselves, but not all (a GET body
cut mid-way, a failed multipart part). torch_ucp wraps whole operations (a ranged read, a data
object upload, the metadata PUT) in :func:`retry`, bounded in attempts and in time. Permanent
errors (missing objects, permission denied, corrupt data, local-disk errors) fail at once, and
so does an endpoint that cannot be reached at all (connection refused, unknown host): a wrong
``endpoint_url`` is not worth minutes of retries.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from torch_ucp import knobs
from torch_ucp.errors import CheckpointError

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN}
_TRANSIENT_NAMES = {
    # botocore
    "HTTPClientError",
    "ConnectionError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    # aiohttp
    "ClientError",
    "ClientPayloadError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ClientOSError",
    # fsspec
    "FSTimeoutError",
}


def error_code(exc: BaseException) -> str | None:
    """The object store's error code (or HTTP status) of ``exc`` or of the first error it
    wraps (botocore's ``response``), e.g. ``"InvalidRange"``, ``"PreconditionFailed"``."""
    for e in _causes(exc):
        code = _response_code(e)
        if code is not None:
            return code
    return None


def _response_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status) if (code or status) else None
    return None


def _causes(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and what it wraps (``__cause__``/``__context__``, aiohttp's ``os_error``)."""
    out: list[BaseException] = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, BaseException) and os_error is not exc:
            out.append(os_error)
        exc = exc.__cause__ or exc.__context__
    return out


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the endpoint cannot be reached at all: connection refused or a
    host name that does not resolve (a temporary DNS failure, ``EAI_AGAIN``, is transient)."""
    for e in _causes(exc):
        if isinstance(e, ConnectionRefusedError):
            return True
        if isinstance(e, socket.gaierror) and e.errno != socket.EAI_AGAIN:
            return True
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed."""
    if is_unreachable(exc):
        return False
    for e in _causes(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, CheckpointError)):
            return False
        code = _response_code(e)
        if code is not None:
            # The store answered and its code decides: botocore's ClientError shares its name
            # with aiohttp's, and the name test below would make NoSuchKey or InvalidArgument
            # (what s3fs leaves untranslated, as the cause of an OSError EIO) transient.
            return code in _TRANSIENT_CODES
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if isinstance(e, socket.gaierror) and e.errno == socket.EAI_AGAIN:
            return True  # a temporary DNS failure (is_unreachable lets it through)
        if any(t.__name__ in _TRANSIENT_NAMES for t in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def retry(
    fn: Callable[[], T],
    what: str,
    *,
    attempts: int | None = None,
    deadline_seconds: float | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors.

    At most ``attempts`` calls (knob ``TORCH_UCP_RETRY_ATTEMPTS``) and no new attempt after
    ``deadline_seconds`` (``TORCH_UCP_RETRY_DEADLINE``); sleeps ``uniform(0, min(cap, base *
    2**i))`` between attempts. ``on_retry`` cleans up before the next attempt (e.g. abort an
    upload). The last error is re-raised with ``what`` and the attempt count in a note.
    """
    attempts = attempts or knobs.retry_attempts()
    deadline = time.monotonic() + (deadline_seconds or knobs.retry_deadline_seconds())
    base, cap = knobs.retry_base_delay(), knobs.retry_max_delay()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            last = attempt == attempts or time.monotonic() >= deadline
            if last or not is_transient(exc):
                if attempt > 1 and hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(f"torch_ucp: {what} failed after {attempt} attempts")
                raise
            delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
            logger.warning(
                "torch_ucp: %s failed (%s: %s); retry %d/%d in %.2fs",
                what, type(exc).__name__, exc, attempt, attempts - 1, delay,
            )
            if on_retry is not None:
                on_retry()
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
    raise AssertionError("unreachable")
