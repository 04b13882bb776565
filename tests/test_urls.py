"""storage.urls: the one place that tells local locations from remote ones and splits them."""

from __future__ import annotations

import os

import pytest

from torch_ucp.storage.urls import is_local_url, local_path, same_location, split_url


@pytest.mark.parametrize(
    "url, local",
    [
        ("/tmp/run", True), ("run/step-1", True), ("file:///tmp/run", True), ("local:///tmp/x", True),
        ("s3://bucket/run", False), ("gs://b/x", False), ("memory://x", False),
        ("simplecache::s3://bucket/run", False),  # chained: fsspec, whatever the last protocol
    ],
)
def test_is_local_url(url, local):
    assert is_local_url(url) is local


def test_local_path_and_split():
    assert local_path("file:///tmp/x") == "/tmp/x" and local_path("rel/x") == "rel/x"
    assert split_url("s3://b/run/model.safetensors/") == ("s3://b/run", "model.safetensors")
    assert split_url("x.pt") == (os.getcwd(), "x.pt")
    assert split_url("/a/b/c") == ("/a/b", "c")


def test_same_location():
    assert same_location("run", os.path.join(os.getcwd(), "run"))
    assert same_location("file:///tmp/run", "/tmp/run/")
    assert same_location("s3://b/run/", "s3://b/run")
    assert not same_location("s3://b/run", "s3://b/run2")
    assert not same_location("/tmp/run", "s3://tmp/run")
