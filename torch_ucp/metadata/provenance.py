"""torch_ucp's layout record inside a *stock* DCP checkpoint, as plain JSON.

When :class:`~torch_ucp.UCPSavePlanner` is used with a stock writer (``FileSystemWriter``), the
checkpoint is stock DCP: DCP pickles ``Metadata`` into ``.metadata``. Its ``planner_data`` must
stay a flatten mapping (stock loaders read it), so torch_ucp adds one extra key,
:data:`UCP_KEY`, holding a JSON string: readable by any unpickler, with no torch_ucp class
inside, so such a checkpoint loads without torch_ucp installed. It records the meshes,
placements, patterns and the writer of every chunk (docs/FORMAT.md, "Stock DCP checkpoints").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torch_ucp.metadata.fields import mesh_to_json, placement_to_json
from torch_ucp.metadata.schema import SaveLayout

UCP_KEY = "__torch_ucp__"


@dataclass
class SaveInfo:
    """What :class:`UCPSavePlanner` records beyond DCP's chunks, as JSON-ready data.

    Attributes:
        meshes: distinct meshes as ``{"shape": [...], "dim_names": [...], "coordinates":
            {rank: coordinate}}``.
        tensors: FQN -> ``{"mesh": i, "placements": [...], "ranks": [rank, ...]}`` where
            ``ranks`` (the writer of each fragment) is aligned with the tensor's chunks in the
            DCP metadata; a tensor whose writers' coordinates are not their mesh's
            ``coordinates`` also has ``"coordinates": [coordinate, ...]``.
        patterns: layout rules recorded at save time.
    """

    meshes: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    patterns: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {"meshes": self.meshes, "tensors": self.tensors, "patterns": self.patterns},
            separators=(",", ":"),
        )

    def sources(self, fqn: str, count: int) -> list[tuple[int | None, tuple[int, ...] | None]]:
        """``(rank, mesh coordinate)`` of the writer of each of ``fqn``'s ``count`` chunks."""
        entry = self.tensors.get(fqn, {})
        ranks = entry.get("ranks")
        if ranks is None:
            return [(None, None)] * count
        coords = entry.get("coordinates")
        if coords is None and entry.get("mesh") is not None:
            table = self.meshes[entry["mesh"]].get("coordinates", {})
            coords = [table.get(str(r)) for r in ranks]
        coords = coords or [None] * len(ranks)
        return [(r, tuple(c) if c is not None else None) for r, c in zip(ranks, coords)]

    @classmethod
    def from_planner_data(cls, planner_data: Any) -> SaveInfo | None:
        if not isinstance(planner_data, dict) or UCP_KEY not in planner_data:
            return None
        d = json.loads(planner_data[UCP_KEY])
        return cls(d.get("meshes", []), d.get("tensors", {}), d.get("patterns", []))


def flatten_mapping_of(planner_data: Any) -> dict[str, list[Any]]:
    """The JSON-ready flatten mapping in ``planner_data`` (without the torch_ucp key)."""
    if not isinstance(planner_data, dict):
        return {}
    return {k: list(v) for k, v in planner_data.items() if k != UCP_KEY}


def save_info(layout: SaveLayout, chunk_writers: Mapping[str, Sequence[int]]) -> SaveInfo:
    """The stock-checkpoint record of ``layout``, with the writer rank of every chunk of each
    tensor (aligned with the tensor's chunks in DCP's metadata)."""
    info = SaveInfo(patterns=list(layout.patterns))
    for mesh in layout.meshes:
        entry = mesh_to_json(mesh)
        entry.pop("ranks", None)
        coordinates = {}
        if mesh.ranks is not None:
            coords = np.stack(np.unravel_index(np.arange(mesh.size), mesh.shape), axis=1).tolist()
            coordinates = {str(r): c for r, c in zip(mesh.ranks, coords)}
        info.meshes.append({**entry, "coordinates": coordinates})
    for fqn, t in layout.tensors.items():
        ranks = [int(r) for r in chunk_writers.get(fqn, ())]
        if t.mesh is None:
            info.tensors[fqn] = {"ranks": ranks}
        else:
            info.tensors[fqn] = {
                "mesh": t.mesh,
                "placements": [placement_to_json(p) for p in t.placements or ()],
                "ranks": ranks,
            }
    return info


class PlannerData(dict):
    """``Metadata.planner_data`` of a torch_ucp save: DCP's flatten mapping (what stock loaders
    read), plus the typed :class:`SaveLayout` the torch_ucp writer commits (``layout``).

    Pickled (a stock writer writing ``.metadata``), it becomes a plain dict that also carries
    the layout as JSON under :data:`UCP_KEY`, computed only then (``chunk_writers`` gives the
    writer of every chunk): the torch_ucp writer never needs it.
    """

    def __init__(
        self,
        mapping: dict[str, tuple],
        layout: SaveLayout,
        chunk_writers: Callable[[], Mapping[str, Sequence[int]]],
    ) -> None:
        super().__init__(mapping)
        self.layout = layout
        self._chunk_writers = chunk_writers

    def provenance_json(self) -> str:
        return save_info(self.layout, self._chunk_writers()).to_json()

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, ({**self, UCP_KEY: self.provenance_json()},))
