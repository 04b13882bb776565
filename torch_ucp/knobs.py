"""Every tunable of torch_ucp in one place.

Each knob has a default chosen for a 2-core CPU machine and an environment override
(``TORCH_UCP_<NAME>``), so a run can be tuned without code changes.  Constructors of the
writer/reader take explicit arguments that win over both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _env_int(name: str, default: int) -> int:
    return _env(name, default, int, "an integer")


def _env_float(name: str, default: float) -> float:
    return _env(name, default, float, "a number")


def _env(name: str, default: Any, parse: Callable[[str], Any], expected: str) -> Any:
    value = os.environ.get(f"TORCH_UCP_{name}")
    if not value:
        return default
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"environment variable TORCH_UCP_{name}={value!r}: expected {expected}") from None


def write_threads() -> int:
    """Writer threads per rank; each streams one data object. Two saturate a local disk with
    several ranks per host (measured: 4 are slower); raise it for object stores."""
    return _env_int("WRITE_THREADS", 2)


def remote_write_threads() -> int:
    """Writer threads per rank on object stores: each is one multipart upload in flight."""
    return _env_int("REMOTE_WRITE_THREADS", 8)


def writeback_chunk_bytes() -> int:
    """Local disk: after each this many bytes, start writeback of the written range (so the
    final fsync has little left to flush) and drop it from the page cache. 0 disables."""
    return _env_int("WRITEBACK_CHUNK_BYTES", 32 << 20)


def read_threads() -> int:
    """Reader threads per rank issuing range reads in parallel."""
    return _env_int("READ_THREADS", 8)


def checksum_block_bytes() -> int:
    """Bytes per checksum block of a fragment (one crc32c each; values and 1-D fragments use flat
    blocks of this size). Blocks are ``block_width`` bytes of ``block_bytes // block_width`` rows,
    so a row or column range of a fragment is verified reading little more than itself."""
    return _env_int("CHECKSUM_BLOCK_BYTES", 64 << 10)


def checksum_block_width() -> int:
    """Bytes of one row per checksum block (rows narrower than this are whole in a block). A
    column range of a fragment widens to multiples of it: 2 KiB keeps a ``Shard(0) -> Shard(1)``
    reshard of 1024 float32 columns exact, and crc32c still runs at several GB/s on 2 KiB."""
    return _env_int("CHECKSUM_BLOCK_WIDTH", 2 << 10)


def content_hash() -> bool:
    """Record every tensor's layout-independent content hash at save time
    (:mod:`torch_ucp.metadata.content_hash`; ``0`` turns it off)."""
    return _env_int("CONTENT_HASH", 1) != 0


SHARE_AUTO = 2


def share_reads() -> int:
    """Whether loading ranks that need the same bytes read them once and share them
    (:mod:`torch_ucp.storage.sharing`) when ``UCPReader(share_reads=None)``: ``0`` off, ``1``
    on, ``2`` (default) on for object stores over a gloo group: never for local disks and NFS,
    where one host's page cache already serves a second reader at memory speed, and over NCCL
    only with ``1`` (not yet measured on a GPU). Measured: from S3 1.1-1.8x faster than reading
    per replica, from a local disk 0.7-1.1x (docs/PERFORMANCE.md)."""
    value = _env_int("SHARE_READS", SHARE_AUTO)
    if value not in (0, 1, SHARE_AUTO):
        raise ValueError(f"TORCH_UCP_SHARE_READS={value!r}: expected 0 (off), 1 (on) or 2 (object stores only)")
    return value


def share_message_bytes() -> int:
    """Largest shared message (one read, sent to the ranks that need it): larger replicated
    boxes are cut into parts, dealt to every rank that needs them."""
    return _env_int("SHARE_MESSAGE_BYTES", 16 << 20)


def share_inflight_bytes() -> int:
    """Bound on the bytes of shared messages a rank holds at once (read ahead, on the wire):
    reads of later messages overlap the transfers of earlier ones within it."""
    return _env_int("SHARE_INFLIGHT_BYTES", 256 << 20)


def share_read_workers() -> int:
    """Shared messages a rank reads from storage at once."""
    return _env_int("SHARE_READ_WORKERS", 4)


def read_waste_ratio() -> float:
    """Largest fraction of unneeded bytes a coalesced or block-expanded read may carry.

    Neighbouring byte ranges are merged into one request, and partial checksum blocks are
    widened to whole blocks for verification, only while the bytes read stay within
    ``(1 + ratio)`` of the bytes needed.
    """
    return _env_float("READ_WASTE_RATIO", 0.10)


def max_coalesce_gap_bytes() -> int:
    """Never merge two byte ranges separated by more than this many bytes."""
    return _env_int("MAX_COALESCE_GAP", 1 << 20)


def coalesce_limit_bytes() -> int:
    """Merge neighbouring ranges only into reads up to this size: merging saves requests for
    small pieces, while large pieces are cheaper read straight into their destination."""
    return _env_int("COALESCE_LIMIT", 4 << 20)


def max_read_request_bytes() -> int:
    """Split single range reads larger than this so big fragments read in parallel."""
    return _env_int("MAX_READ_REQUEST", 64 << 20)


def write_buffer_bytes() -> int:
    """Block size handed to fsspec for streaming writes (multipart part size on S3)."""
    return _env_int("WRITE_BUFFER_BYTES", 32 << 20)


def retry_attempts() -> int:
    """Calls of one storage operation before a transient error is final."""
    return _env_int("RETRY_ATTEMPTS", 6)


def retry_deadline_seconds() -> float:
    """No new retry of one storage operation after this many seconds."""
    return _env_float("RETRY_DEADLINE", 120.0)


def retry_base_delay() -> float:
    return _env_float("RETRY_BASE_DELAY", 0.2)


def retry_max_delay() -> float:
    return _env_float("RETRY_MAX_DELAY", 5.0)


def max_staging_bytes() -> int:
    """Bound of the host memory an async save stages into, per process (0: no bound).
    A larger state is staged in part and the writer copies the rest while the caller waits."""
    return _env_int("MAX_STAGING_BYTES", 0)


def max_metadata_bytes() -> int:
    """Largest ``.metadata`` header torch_ucp parses (checked before reading it whole): a
    bound on memory for damaged or hostile checkpoints. 256 MiB holds ~2M tensors."""
    return _env_int("MAX_METADATA_BYTES", 256 << 20)


def commit_lock_timeout() -> float:
    """Local/NFS: seconds a commit waits for the commit lock another save holds (held for the
    few milliseconds of a compare-and-rename) before failing."""
    return _env_float("COMMIT_LOCK_TIMEOUT", 60.0)


def launch_start_method() -> str:
    """How :func:`torch_ucp.demo.launch.run_distributed` starts ranks: ``forkserver`` (torch
    imported once, ranks fork from it) or ``spawn`` (a fresh interpreter per rank)."""
    return os.environ.get("TORCH_UCP_LAUNCH_START_METHOD") or "forkserver"


def explain_stock_readers() -> bool:
    """Wrap stock DCP's ``FileSystemReader.read_metadata`` when torch_ucp is imported, so that a
    stock reader pointed at a torch_ucp checkpoint says so and names the calls to use instead of
    failing with ``UnpicklingError: invalid load key, '{'`` (:mod:`torch_ucp.interop.
    stock_readers`). ``TORCH_UCP_EXPLAIN_STOCK_READERS=0`` leaves stock DCP untouched."""
    return _env_int("EXPLAIN_STOCK_READERS", 1) != 0
