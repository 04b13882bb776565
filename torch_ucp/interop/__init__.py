"""Readers that load other frameworks' checkpoints through ``torch.distributed.checkpoint``.

- :class:`DeepSpeedUniversalReader`: a DeepSpeed universal checkpoint (``ds_to_universal``
  output) into a PyTorch model + optimizer state dict on any mesh.
- :class:`SafetensorsReader`: Hugging Face safetensors weights (one file or a sharded folder
  with ``model.safetensors.index.json``) into a model on any mesh, reading only the byte ranges
  each rank needs.
"""

from torch_ucp.interop.deepspeed import DeepSpeedUniversalReader
from torch_ucp.interop.safetensors import SafetensorsReader

__all__ = ["DeepSpeedUniversalReader", "SafetensorsReader"]
