"""Per-fragment provenance carried through DCP's plans and metadata as plain JSON.

DCP's ``Metadata.planner_data`` must stay a flatten mapping (stock loaders read it), so torch_ucp
adds one extra key, :data:`UCP_KEY`, holding a JSON string: readable by any unpickler, with no
torch_ucp class inside, so a stock DCP checkpoint written with :class:`UCPSavePlanner` loads
without torch_ucp installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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
