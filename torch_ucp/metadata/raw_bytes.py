"""A tensor as the format stores it: its elements' raw bytes, in C order, on the host."""

from __future__ import annotations

import torch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a zero-copy view (copies only to make it CPU-contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
