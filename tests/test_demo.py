"""`torch-ucp demo` end to end, through the console script as a new user runs it."""

from __future__ import annotations

import subprocess
import sys

from tests.support.console import TORCH_UCP


def test_demo_runs_and_verifies_bit_exact(tmp_path):
    out = subprocess.run(
        [TORCH_UCP, "demo", "--out", str(tmp_path), "--steps", "2", "--keep"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("save ", "load "))]
    assert len(rows) == 4, out.stdout
    assert sum("ok (bit-exact)" in r for r in rows) == 3, out.stdout
    assert (tmp_path / "step-2" / ".metadata").is_file()  # TorchTitan's discovery test
    assert f"kept the checkpoint at {tmp_path / 'step-2'}" in out.stdout  # says what it keeps
    # the kept checkpoint verifies end to end
    verify = subprocess.run(
        [sys.executable, "-m", "torch_ucp", "verify", str(tmp_path / "step-2")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stdout + verify.stderr


def test_demo_help():
    out = subprocess.run([TORCH_UCP, "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--steps" in out.stdout and "--out" in out.stdout


def test_demo_comparison_flags_any_difference():
    import torch

    from torch_ucp.demo.run import _compare

    ref = {"w": torch.arange(6.0), "step": 3, "name": "x"}
    assert _compare({"w": torch.arange(6.0), "step": 3, "name": "x"}, ref) == []
    changed = torch.arange(6.0)
    changed[4] = torch.nextafter(changed[4], torch.tensor(10.0))  # one ulp
    assert _compare({"w": changed, "step": 3, "name": "x"}, ref) == ["w: values differ"]
    assert _compare({"w": torch.arange(6.0).double(), "step": 4}, ref) == [
        "w: wrong type/dtype",
        "step: 4 != 3",
        "name: not loaded",
    ]
