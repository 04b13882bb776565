"""The torch_ucp on-disk format: typed schema, JSON codec and version check."""

from torch_ucp.metadata.codec import decode_metadata, encode_metadata
from torch_ucp.metadata.schema import (
    FORMAT_VERSION,
    METADATA_FILE,
    CheckpointMetadata,
    Fragment,
    MeshInfo,
    ObjectEntry,
    PlacementInfo,
    StoredBytes,
    TensorEntry,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "CheckpointMetadata",
    "Fragment",
    "MeshInfo",
    "ObjectEntry",
    "PlacementInfo",
    "StoredBytes",
    "TensorEntry",
    "decode_metadata",
    "encode_metadata",
]
