"""Checkpoint locations as text: local paths and fsspec URLs (``s3://bucket/run/step-100``).

The one place that decides whether a location is local (:func:`open_store` picks its
:class:`~torch_ucp.storage.store.Store` with it) and how a location splits into a folder and a
name, so that every caller agrees on ``file://`` URLs and on relative paths.
"""

from __future__ import annotations

import os
import posixpath

import fsspec


def is_local_url(url: str) -> bool:
    """A local path or a ``file://`` / ``local://`` URL; ``False`` for any other protocol and
    for chained URLs (``simplecache::s3://...``)."""
    return "::" not in url and fsspec.core.split_protocol(url)[0] in (None, "file", "local")


def local_path(url: str) -> str:
    """The filesystem path of a local location: ``file:///tmp/x`` -> ``/tmp/x``, a path as is."""
    protocol, path = fsspec.core.split_protocol(url)
    return path if protocol else url


def split_url(url: str) -> tuple[str, str]:
    """``(parent, name)`` of a location: ``s3://b/run/model.safetensors`` -> ``("s3://b/run",
    "model.safetensors")``; a local path is made absolute first (``x.pt`` -> ``(cwd, "x.pt")``)."""
    if "://" in url:
        return posixpath.split(url.rstrip("/"))
    return os.path.split(os.path.abspath(url))


def same_location(a: str, b: str) -> bool:
    """Whether two locations name the same folder (local paths compared absolute)."""
    if is_local_url(a) and is_local_url(b):
        return os.path.abspath(local_path(a)) == os.path.abspath(local_path(b))
    return a.rstrip("/") == b.rstrip("/")
