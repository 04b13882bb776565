"""DCP's ``FileSystemWriter`` / ``FileSystemReader`` options given to ``UCPWriter`` / ``UCPReader``.

Code moving from stock DCP passes the stock options along. Each is either honoured or refused
with what to do instead, never passed on to fsspec as a storage option (where it would be
ignored or fail obscurely):

=========================== ==================================================================
stock option                torch_ucp
=========================== ==================================================================
``thread_count=N``          ``threads=N``: writer threads, each writing one data object
``single_file_per_rank``    ``True`` is what UCPWriter always does (one object per writer
                            thread); ``False`` (one file per tensor) is refused
``sync_files``              ``True`` is what UCPWriter always does (data and indexes are made
                            durable before the header commits them); ``False`` is refused
``overwrite``               supported; the default is ``False`` (stock: ``True``)
``per_thread_copy_ahead``   refused: fragments are copied off the device as they are
                            written; overlap saving with training with ``torch_ucp.async_save``
``cache_staged_state_dict`` ``False`` only: UCPWriter does not stage; ``torch_ucp.async_save``
                            keeps its staging pool between saves
``_extensions``             ``None`` / ``[]`` only: stream transforms (``ZStandard``) would make
                            range reads decompress whole fragments; fragments are stored raw
``serialization_format``    refused: the format is torch_ucp's (``torch-ucp export`` writes
                            ``torch.save`` or safetensors files)
``_extension_registry``     reader: ``None`` only (torch_ucp checkpoints have no transforms)
=========================== ==================================================================
"""

from __future__ import annotations

from typing import Any

_WRITER_REFUSED = {
    "per_thread_copy_ahead": (
        "UCPWriter copies each fragment off the device as it writes it, so there is no "
        "copy-ahead window to size; to overlap saving with training use torch_ucp.async_save "
        "(or dcp.async_save with UCPWriter)"
    ),
    "serialization_format": (
        "UCPWriter writes the torch_ucp format (raw fragments, range-readable); to get a "
        "torch.save or safetensors file use `torch-ucp export URL OUT --format torch|safetensors`"
    ),
}


def writer_threads(options: dict[str, Any], threads: int | None) -> int | None:
    """Take the stock ``FileSystemWriter`` options out of ``options`` (UCPWriter's fsspec storage
    options), check them (see the module docstring), and return the writer thread count."""
    for name, why in _WRITER_REFUSED.items():
        if name in options:
            raise ValueError(f"UCPWriter: {name} is not supported: {why}")
    thread_count = options.pop("thread_count", None)
    if thread_count is not None:
        if threads is not None and threads != thread_count:
            raise ValueError(
                f"UCPWriter: threads={threads} and thread_count={thread_count} disagree; "
                "give threads= only (thread_count is stock DCP's name for it)"
            )
        threads = thread_count
    _require("single_file_per_rank", options, True, (
        "one file per tensor is not supported: UCPWriter writes one data object per writer "
        "thread, and reads any fragment, or any part of one, by byte range"
    ))
    _require("cache_staged_state_dict", options, False, (
        "UCPWriter does not stage state dicts; torch_ucp.async_save keeps its staging pool "
        "between saves (with dcp.async_save, pass async_stager=DefaultStager(StagingOptions(...)))"
    ))
    _require("sync_files", options, True, (
        "UCPWriter always makes data and fragment indexes durable before the header commits "
        "them, so a committed checkpoint never refers to unsynced data"
    ))
    extensions = options.pop("_extensions", None)
    if extensions:
        names = ", ".join(type(e).__name__ for e in extensions)
        raise ValueError(
            f"UCPWriter: _extensions ({names}) are not supported: fragments are stored as raw "
            "bytes so that any byte range of a tensor can be read and verified in place, which a "
            "stream transform (compression, encryption) would prevent. Leave them out, or "
            "compress at the storage layer"
        )
    return threads


def check_reader_options(options: dict[str, Any]) -> None:
    """Take the stock ``FileSystemReader`` options out of ``options`` (UCPReader's fsspec
    storage options) and check them."""
    if options.pop("_extension_registry", None) is not None:
        raise ValueError(
            "UCPReader: _extension_registry is not supported: torch_ucp checkpoints store raw "
            "bytes, with no stream transforms to undo"
        )


def _require(name: str, options: dict[str, Any], supported: Any, why: str) -> None:
    if name in options:
        value = options.pop(name)
        if value != supported:
            raise ValueError(f"UCPWriter: {name}={value!r} is not supported: {why}")
