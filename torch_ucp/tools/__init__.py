"""Whole-checkpoint tools as a Python API: read any format, export, convert.

``torch-ucp inspect``, ``export`` and ``convert`` are command lines over these functions:

- :func:`open_source`: any checkpoint torch_ucp reads (torch_ucp, stock DCP, DeepSpeed
  universal, safetensors) as one :class:`CheckpointSource` of keys, dtypes, shapes and
  whole-tensor reads;
- :func:`export_safetensors` / :func:`export_torch`: consolidated full tensors as Hugging Face
  safetensors (sharded or not) or one ``torch.save`` file, one tensor in memory at a time
  (:func:`plan_export` says what they will write);
- :func:`convert_checkpoint`: any of those formats rewritten as a torch_ucp checkpoint.

Example::

    from torch_ucp.tools import export_safetensors

    export_safetensors("s3://bucket/run/step-100", "./hf", keys=["model.*"],
                       strip_prefix="model.", dtype=torch.bfloat16, max_shard_size="5GB",
                       storage_options={"endpoint_url": "http://127.0.0.1:9000"})

Bad arguments raise :class:`~torch_ucp.errors.OptionError` (a ``ValueError``); problems with
the checkpoint a :class:`~torch_ucp.errors.CheckpointError`.
"""

from torch_ucp.tools.convert import ConvertResult, convert_checkpoint
from torch_ucp.tools.export import (
    ExportItem,
    ExportPlan,
    ExportResult,
    export_safetensors,
    export_torch,
    plan_export,
)
from torch_ucp.tools.safetensors_writer import SafetensorsFileWriter
from torch_ucp.tools.sources import (
    FORMATS,
    CheckpointSource,
    TensorInfo,
    ValueInfo,
    detect_format,
    open_source,
    select_keys,
)

__all__ = [
    "FORMATS",
    "CheckpointSource",
    "ConvertResult",
    "ExportItem",
    "ExportPlan",
    "ExportResult",
    "SafetensorsFileWriter",
    "TensorInfo",
    "ValueInfo",
    "convert_checkpoint",
    "detect_format",
    "export_safetensors",
    "export_torch",
    "open_source",
    "plan_export",
    "select_keys",
]
