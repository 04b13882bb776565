import os
import sys

import pytest
from hypothesis import settings

# `tests.support` must be importable however pytest is launched (`pytest` or
# `python -m pytest`, from any directory).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


# Property tests draw the same examples on every run, so a CI run never turns red on an example
# no earlier run drew; `pytest --hypothesis-profile=explore` draws fresh ones to hunt for bugs.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")

# ---------------------------------------------------------------------------
# S3 fixtures: a real S3-compatible HTTP server (moto server mode) on 127.0.0.1,
# reached through s3fs exactly as user code would (see tests/support/s3.py and
# tests/support/fault_proxy.py).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """A started :class:`tests.support.s3.S3Server`, shared by the whole session."""
    from tests.support.s3 import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, uniquely named bucket: yields ``("s3://<bucket>", storage_options)``.

    The bucket and its contents are deleted afterwards (best effort).
    """
    from tests.support.s3 import unique_bucket_name

    name = s3_server.create_bucket(unique_bucket_name(request.node.name[:24]))
    yield f"s3://{name}", s3_server.storage_options()
    s3_server.delete_bucket(name)


# ---------------------------------------------------------------------------
