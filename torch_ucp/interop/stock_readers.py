"""What stock DCP's readers say when pointed at a torch_ucp checkpoint.

Stock entry points that build their own reader from a path - ``dcp.load(sd, checkpoint_id=dir)``,
``format_utils.dcp_to_torch_save(dir, out)``, ``FileSystemReader(dir).read_metadata()``,
``FsspecReader`` - unpickle ``dir/.metadata``. A torch_ucp checkpoint's ``.metadata`` is its JSON
header, so pickle fails at the first byte (``UnpicklingError: invalid load key, '{'``).

Why not make them work: stock readers take every fragment's location from that one pickle and
``torch.load`` every fragment's bytes, so a stock-readable checkpoint would need a pickled
``Metadata`` listing every chunk (it grows with the fragment count, which format version 2
keeps out of the header, and stock readers open exactly ``.metadata``, the torch_ucp commit
point) *and* every fragment wrapped as a ``torch.save`` archive. Instead, once torch_ucp is
imported, the stock readers' ``read_metadata`` is wrapped so that this one failure becomes an
:class:`~torch_ucp.errors.NotStockCheckpointError` (an ``UnsupportedFormatError`` and still an
``UnpicklingError``) naming torch_ucp and the calls to use
(:func:`stock_reader_message`). Nothing else about them changes: stock checkpoints are read as
before, and the wrapper reads a few bytes of ``.metadata`` only after pickle has failed.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

from torch_ucp import _compat
from torch_ucp.errors import NotStockCheckpointError
from torch_ucp.metadata.header import is_torch_ucp_header

_SNIFF_BYTES = 4096


def stock_reader_message(checkpoint: str) -> str:
    """What to do instead, for a stock reader pointed at the torch_ucp checkpoint ``checkpoint``."""
    c = checkpoint
    return (
        f"{c} is a torch_ucp checkpoint: its .metadata is torch_ucp's JSON header, not a stock DCP "
        "pickle, so DCP's FileSystemReader / FsspecReader cannot read it. Use torch_ucp: "
        f"dcp.load(state_dict, storage_reader=torch_ucp.UCPReader({c!r}), "
        f"planner=torch_ucp.UCPLoadPlanner()) or torch_ucp.load(state_dict, {c!r}) to load it; "
        f"torch_ucp.open_checkpoint({c!r}) to read its tensors in one process; "
        f"`torch-ucp export {c} OUT.pt --format torch` to write the single torch.save file that "
        "format_utils.dcp_to_torch_save makes"
    )


def _sniff(reader: Any, rank: int | None) -> bool:
    try:
        with _compat.open_stock_metadata(reader, rank) as f:
            return is_torch_ucp_header(f.read(_SNIFF_BYTES))
    except Exception:  # noqa: BLE001 - no answer: the reader's own error stands
        return False


def _wrap(read_metadata: Any) -> Any:
    @functools.wraps(read_metadata)
    def read_metadata_or_explain(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return read_metadata(self, *args, **kwargs)
        except pickle.UnpicklingError as e:
            if not _sniff(self, kwargs.get("rank")):
                raise
            raise NotStockCheckpointError(stock_reader_message(str(self.path))) from e

    read_metadata_or_explain.__torch_ucp_wrapped__ = read_metadata  # type: ignore[attr-defined]
    return read_metadata_or_explain


def install() -> None:
    """Wrap stock ``FileSystemReader.read_metadata`` (``FsspecReader`` inherits it); idempotent."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    current = FileSystemReader.__dict__.get("read_metadata")
    if current is None or hasattr(current, "__torch_ucp_wrapped__"):
        return
    FileSystemReader.read_metadata = _wrap(current)  # type: ignore[method-assign]
