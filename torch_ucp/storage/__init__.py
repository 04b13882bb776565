"""fsspec storage: UCPWriter / UCPReader, the read engine, checksums."""

from torch_ucp.storage.reader import UCPReader
from torch_ucp.storage.writer import UCPWriter

__all__ = ["UCPReader", "UCPWriter"]
