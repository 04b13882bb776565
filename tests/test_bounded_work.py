"""Work bounded by the input's size, whatever a checkpoint claims.

- A recorded pattern glob built to backtrack (40 ``*`` then ``Q``) does not hang ``dcp.load``:
  globs are matched without backtracking, with the same results as the regex form they replace.
- Reading a tensor of 80,000 small fragments is linear-time (it was quadratic: 80k took 63 s).
"""

from __future__ import annotations

import random
import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.support import format_v2 as spec
from torch_ucp import UCPLoadPlanner, UCPReader, UCPSavePlanner, UCPWriter
from torch_ucp.metadata.checksums import DEFAULT_ALGORITHM, BlockGrid
from torch_ucp.metadata.schema import StoredBytes
from torch_ucp.patterns.base import glob_regex
from torch_ucp.storage.fragment_reader import BoxRead, FragmentReader
from torch_ucp.storage.store import open_store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _regex_form(glob: str) -> re.Pattern[str]:
    """The regex the globs used to compile to (the reference semantics)."""
    parts = []
    for comp in glob.split("."):
        if comp == "**":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)")
            continue
        out = ""
        for token in re.split(r"(\*|\{i\})", comp):
            out += {"*": r"[^.]*", "{i}": r"(?P<item>\d+)"}.get(token, re.escape(token))
        parts.append(out)
    body = r"\.".join(parts)
    return re.compile(rf"(?:^|^.*\.)(?P<param>{body})(?P<state>\.[^.]+)?$")


def test_globs_match_as_the_regex_form_did():
    rng = random.Random(0)
    agreed = 0
    for _ in range(20000):
        comps, has_item = [], False
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.2:
                comps.append("**")
            elif r < 0.3 and not has_item:
                comps.append("{i}")
                has_item = True
            else:
                comps.append("".join(rng.choice("ab*1") for _ in range(rng.randint(0, 3))))
        glob = ".".join(comps)
        key = ".".join(rng.choice(["a", "b", "ab", "", "1", "12", "x"]) for _ in range(rng.randint(1, 6)))
        try:
            new = glob_regex(glob, item=True)
        except ValueError:
            continue
        old = _regex_form(glob).match(key)
        got = new.match(key)
        assert bool(old) == bool(got), (glob, key)
        if old:
            for group in ("param", "state") + (("item",) if has_item else ()):
                assert old.group(group) == got.group(group), (glob, key, group)
                if old.group(group) is not None:
                    assert old.span(group) == got.span(group), (glob, key, group)
            agreed += 1
    assert agreed > 1000


@pytest.mark.timeout(60)
def test_backtracking_glob_recorded_in_a_checkpoint_does_not_hang_load(tmp_path):
    url = str(tmp_path / "ckpt")
    long_key = "a" * 60  # no Q: the regex form tried every way to split it among the stars
    state = {long_key: torch.arange(6.0), "model": {long_key: torch.ones(2, 3)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=UCPWriter(url), planner=UCPSavePlanner(), no_dist=True)
    header = spec.read_header(url)
    header["patterns"] = [{"kind": "fused", "glob": "*" * 40 + "Q", "parts": [1, 1], "dim": 0,
                           "mesh_dim": "tp", "degree": None}]
    spec.write_header(url, header)
    target = {long_key: torch.zeros(6), "model": {long_key: torch.zeros(2, 3)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=UCPReader(url), planner=UCPLoadPlanner(), no_dist=True)
    assert torch.equal(target[long_key], torch.arange(6.0))
    assert glob_regex("*" * 40 + "Q").match("a" * 200) is None
    assert glob_regex(".".join(["**"] * 30) + ".Q").match(".".join(["a"] * 200)) is None


@pytest.mark.timeout(120)
def test_reading_80k_small_fragments(tmp_path):
    """One data object of 80,000 fragments of 4 float32 each (one row of a [80000, 4] tensor
    each), read into one destination: verified and bit-exact."""
    n = 80_000
    root = tmp_path / "ckpt"
    (root / "data-x").mkdir(parents=True)
    data = torch.arange(n * 4, dtype=torch.float32)
    raw = data.numpy().tobytes()
    (root / "data-x" / "0.bin").write_bytes(raw)
    grid = BlockGrid.for_fragment((1, 4), 4, 64 << 10, 2048)
    dest = torch.empty(n, 4)
    reads = []
    for i in range(n):
        chunk = memoryview(raw)[16 * i : 16 * i + 16]
        stored = StoredBytes("data-x/0.bin", 16 * i, 16, tuple(grid.checksums(chunk, DEFAULT_ALGORITHM)))
        reads.append(BoxRead("w", stored, torch.float32, (i, 0), (1, 4), (0, 0), (1, 4), dest[i : i + 1]))
    reader = FragmentReader(open_store(str(root)), checksum_algorithm=DEFAULT_ALGORITHM,
                            block_bytes=64 << 10, block_width=2048)
    stats = reader.read(reads)
    assert torch.equal(dest.reshape(-1), data)
    assert stats.bytes_verified == stats.bytes_needed == n * 16
    assert stats.requests < n // 100  # small neighbours were merged into few reads
