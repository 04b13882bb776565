"""Readers that load other frameworks' checkpoints through ``torch.distributed.checkpoint``.

- :class:`DeepSpeedUniversalReader`: a DeepSpeed universal checkpoint (``ds_to_universal``
  output) into a PyTorch model + optimizer state dict on any mesh.
"""

from torch_ucp.interop.deepspeed import DeepSpeedUniversalReader

__all__ = ["DeepSpeedUniversalReader"]
