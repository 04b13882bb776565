"""The torch_ucp on-disk format: typed schema, header and index codecs, versioning.

docs/FORMAT.md is the specification; this package is its implementation and imports nothing
above it (planners and storage build on it, never the reverse).
"""

from torch_ucp.metadata.catalog import Fragment, FragmentCatalog
from torch_ucp.metadata.fragments import FragmentRows, tensor_key
from torch_ucp.metadata.header import decode_metadata, encode_header
from torch_ucp.metadata.index import decode_index, encode_index
from torch_ucp.metadata.schema import (
    FORMAT_VERSION,
    METADATA_FILE,
    CheckpointMetadata,
    IndexRef,
    MeshInfo,
    PlacementInfo,
    SaveLayout,
    StoredBytes,
    TensorEntry,
    ValueEntry,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "CheckpointMetadata",
    "Fragment",
    "FragmentCatalog",
    "FragmentRows",
    "IndexRef",
    "MeshInfo",
    "PlacementInfo",
    "SaveLayout",
    "StoredBytes",
    "TensorEntry",
    "ValueEntry",
    "decode_index",
    "decode_metadata",
    "encode_header",
    "encode_index",
    "tensor_key",
]
