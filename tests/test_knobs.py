"""Every tunable reads ``TORCH_UCP_<NAME>``; a malformed value is an error naming the variable."""

from __future__ import annotations

import inspect
import os

import pytest

from torch_ucp import knobs

KNOBS = [
    fn for name, fn in inspect.getmembers(knobs, inspect.isfunction)
    if not name.startswith("_") and fn.__module__ == knobs.__name__ and name != "launch_start_method"
]


@pytest.mark.parametrize("knob", KNOBS, ids=lambda fn: fn.__name__)
def test_default_is_a_non_negative_number(knob, monkeypatch):
    for var in [v for v in os.environ if v.startswith("TORCH_UCP_")]:
        monkeypatch.delenv(var)
    value = knob()
    assert isinstance(value, (int, float)) and value >= 0, (knob.__name__, value)


def test_environment_overrides_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("TORCH_UCP_READ_THREADS", "3")
    monkeypatch.setenv("TORCH_UCP_READ_WASTE_RATIO", "0.5")
    assert knobs.read_threads() == 3 and knobs.read_waste_ratio() == 0.5
    monkeypatch.setenv("TORCH_UCP_READ_THREADS", "many")
    with pytest.raises(ValueError, match=r"TORCH_UCP_READ_THREADS='many': expected an integer"):
        knobs.read_threads()
    monkeypatch.setenv("TORCH_UCP_RETRY_DEADLINE", "soon")
    with pytest.raises(ValueError, match=r"TORCH_UCP_RETRY_DEADLINE='soon': expected a number"):
        knobs.retry_deadline_seconds()
