"""What a rank tells the coordinator about its write items: a columnar summary, not the items.

Stock DCP gathers every rank's ``SavePlan`` with its full list of ``WriteItem`` objects; at
8,192 ranks of a 70B model that is ~24M pickled objects on one process. torch_ucp keeps the items
on their rank (:class:`RankLocalItems` pickles as an empty list) and sends a
:class:`LocalPlanTable` instead:

- ``catalog``: one zlib-compressed JSON document naming every key of the local plan with its
  kind, dtype, global shape, DTensor layout (mesh with its rank table, placements), pattern
  index map and flatten path. It is the same on every rank of a regular layout, so the
  coordinator parses it once per distinct ``digest``;
- per item, numbers in numpy arrays: catalog index, box offsets and lengths, bytes;
- per layout, this rank's mesh coordinate.

The coordinator answers with a :class:`WriterAssignment`: one flag per local item, "you write it".
"""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from torch_ucp.errors import SavePlanError
from torch_ucp.metadata.dcp import write_item_nbytes
from torch_ucp.metadata.dtypes import dtype_to_name
from torch_ucp.metadata.fields import mesh_to_json, placement_to_json
from torch_ucp.metadata.schema import DimMap, MeshInfo, PlacementInfo

TENSOR = "t"
SHARDED = "s"  # a tensor saved from ShardedTensors
BYTES = "b"


class RankLocalItems(list):
    """A local plan's items (write or read items). They stay on their rank: pickled (to the
    coordinator, by DCP's gather), this list is empty, since the coordinator plans from a
    compact summary (save: the :class:`LocalPlanTable`; load: nothing). Copies inside the
    process keep the items.

    ``unreplicated`` (load, from :class:`~torch_ucp.UCPLoadPlanner`): per target key whose
    DTensor is replicated on no mesh dim of more than one rank, its mesh's ranks. No other rank
    of that mesh needs the boxes this rank reads for it, so a shared read (which then only
    needs the other targets) can leave them out of its summary."""

    unreplicated: dict[str, frozenset[int]]

    def __init__(self, items: Any = (), unreplicated: dict[str, frozenset[int]] | None = None) -> None:
        super().__init__(items)
        self.unreplicated = unreplicated or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, ())

    def __copy__(self) -> RankLocalItems:
        return RankLocalItems(self, self.unreplicated)

    def __deepcopy__(self, memo: dict[int, Any]) -> RankLocalItems:
        return RankLocalItems(copy.deepcopy(list(self), memo), self.unreplicated)


@dataclass
class LocalPlanTable:
    """A rank's write items as columns (see the module docstring).

    Attributes:
        catalog: zlib-compressed JSON ``{"keys": [[name, kind, dtype, shape, layout, path,
            dim_map], ...], "layouts": [[mesh, placements], ...]}``; ``layout`` indexes
            ``layouts`` or is -1; ``mesh`` and ``placements`` are in the header's JSON form
            (docs/FORMAT.md), ``dim_map`` a pattern's index map or ``None``.
        digest: hash of ``catalog``.
        coordinates: this rank's mesh coordinate per layout.
        rows / ndim: items, and the width of their boxes.
        wide: offsets and lengths are int64 (else int32).
        columns: zlib-compressed, per item: key (the index of its catalog entry, int32), box
            offsets and lengths (padded with 0 / 1), bytes (int64). Boxes of one rank repeat
            from tensor to tensor, so this is ~8x smaller than the raw arrays.
    """

    catalog: bytes
    digest: str
    coordinates: list[list[int] | None]
    rows: int
    ndim: int
    wide: bool
    columns: bytes

    @classmethod
    def pack(
        cls,
        catalog: bytes,
        digest: str,
        coordinates: list[list[int] | None],
        key: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        nbytes: np.ndarray,
    ) -> LocalPlanTable:
        """A table of these columns (``catalog`` already compressed)."""
        n, ndim = offsets.shape
        wide = bool(n) and max(int(offsets.max(initial=0)), int(lengths.max(initial=0))) >= 2**31
        coord = np.int64 if wide else np.int32
        raw = b"".join(
            np.ascontiguousarray(a, dtype=d).tobytes()
            for a, d in ((key, np.int32), (offsets, coord), (lengths, coord), (nbytes, np.int64))
        )
        return cls(catalog, digest, coordinates, n, ndim, wide, zlib.compress(raw, 1))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(key, offsets, lengths, nbytes)``, decompressed."""
        raw = zlib.decompress(self.columns)
        n, ndim = self.rows, self.ndim
        coord = np.int64 if self.wide else np.int32
        w = np.dtype(coord).itemsize
        key = np.frombuffer(raw, np.int32, n, 0)
        offsets = np.frombuffer(raw, coord, n * ndim, 4 * n).reshape(n, ndim)
        lengths = np.frombuffer(raw, coord, n * ndim, 4 * n + w * n * ndim).reshape(n, ndim)
        nbytes = np.frombuffer(raw, np.int64, n, 4 * n + 2 * w * n * ndim)
        return key, offsets, lengths, nbytes

    def parse_catalog(self) -> dict[str, Any]:
        return json.loads(zlib.decompress(self.catalog))

    def __len__(self) -> int:
        return self.rows


@dataclass
class LocalTableBuilder:
    """Accumulates a rank's catalog while its planner creates write items."""

    keys: list[list[Any]] = field(default_factory=list)
    layouts: list[list[Any]] = field(default_factory=list)
    coordinates: list[list[int] | None] = field(default_factory=list)
    _key_index: dict[str, int] = field(default_factory=dict)
    _layout_index: dict[str, int] = field(default_factory=dict)

    def add_layout(self, mesh: MeshInfo, placements: Sequence[PlacementInfo], coordinate: Any) -> int:
        """Index of the layout ``mesh`` + ``placements`` (this rank at ``coordinate``)."""
        mesh_json = mesh_to_json(mesh)
        placements = [placement_to_json(p) for p in placements]
        token = json.dumps([mesh_json, placements, coordinate], separators=(",", ":"))
        index = self._layout_index.get(token)
        if index is None:
            index = self._layout_index[token] = len(self.layouts)
            self.layouts.append([mesh_json, placements])
            self.coordinates.append(list(coordinate) if coordinate is not None else None)
        return index

    def add_tensor(
        self,
        name: str,
        dtype: torch.dtype,
        shape: Sequence[int],
        layout: int,
        path: Sequence[Any] | None,
        dim_map: DimMap | None = None,
        kind: str = TENSOR,
    ) -> None:
        """Name a tensor in the catalog, in state-dict order, even if this rank holds none of it
        (so ranks of one layout send identical catalogs); ``kind``: :data:`TENSOR` or
        :data:`SHARDED`."""
        if name not in self._key_index:
            self._key_index[name] = len(self.keys)
            dmap = None
            if dim_map is not None:
                dmap = [dim_map.dim, dim_map.physical_size, [[s.physical, s.logical, s.length] for s in dim_map.segments]]
            try:
                dtype_name = dtype_to_name(dtype)
            except ValueError as e:
                raise SavePlanError(f"{name}: cannot save: {e}") from None
            self.keys.append([name, kind, dtype_name, list(shape), layout, list(path) if path else None, dmap])

    def build(
        self,
        items: Sequence[WriteItem],
        layout_of: dict[str, int],
        paths: dict[str, Sequence[Any]],
    ) -> LocalPlanTable:
        """The table of ``items``; ``layout_of`` maps a key to its layout, ``paths`` to its
        flatten path."""
        n = len(items)
        ndim = max((len(i.tensor_data.size) for i in items if i.tensor_data is not None), default=0)
        key = np.empty(n, dtype=np.int32)
        offsets = np.zeros((n, ndim), dtype=np.int64)
        lengths = np.ones((n, ndim), dtype=np.int64)
        nbytes = np.empty(n, dtype=np.int64)
        for i, item in enumerate(items):
            name = item.index.fqn
            k = self._key_index.get(name)
            if k is None:  # not named by add_tensor: a value, or an item from another planner
                td = item.tensor_data
                if td is None or item.type == WriteItemType.BYTE_IO:
                    path = paths.get(name)
                    self.keys.append([name, BYTES, None, None, -1, list(path) if path else None, None])
                    self._key_index[name] = len(self.keys) - 1
                else:
                    self.add_tensor(name, td.properties.dtype, td.size, layout_of.get(name, -1), paths.get(name))
                k = self._key_index[name]
            key[i] = k
            nbytes[i] = write_item_nbytes(item)
            td = item.tensor_data
            if td is not None:
                d = len(td.chunk.offsets)
                offsets[i, :d] = td.chunk.offsets
                lengths[i, :d] = td.chunk.sizes
        catalog = json.dumps({"keys": self.keys, "layouts": self.layouts}, separators=(",", ":")).encode()
        return LocalPlanTable.pack(
            zlib.compress(catalog, 9),  # sent by every rank: worth the extra milliseconds
            hashlib.blake2b(catalog, digest_size=16).hexdigest(),
            self.coordinates,
            key,
            offsets,
            lengths,
            nbytes,
        )


@dataclass(frozen=True)
class WriterAssignment:
    """The coordinator's answer in ``SavePlan.planner_data``: which local items this rank
    writes (replicated items are written by one holder only)."""

    keep: np.ndarray  # bool per local item, in local plan order

    def select(self, items: Sequence[WriteItem]) -> list[WriteItem]:
        if len(items) != len(self.keep):
            raise SavePlanError(
                f"the global plan assigns {len(self.keep)} items but this rank planned "
                f"{len(items)}; was the planner reused across saves?"
            )
        return [item for item, keep in zip(items, self.keep.tolist()) if keep]
