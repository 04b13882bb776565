"""Which writer rank's fragment index holds the rows a box of a tensor needs.

A version-2 checkpoint lists no fragment in its header; each writer rank's index lists what that
rank wrote. A loading rank reads only the indexes its boxes overlap, found from the header's
tensor table alone:

- a tensor with ``writers`` (plain tensors, irregular layouts): those ranks' indexes;
- a DTensor with ``mesh`` + ``placements``: along every tensor dim, the placements tell which
  coordinate of the mesh dims that shard it holds each index (:func:`~.placements.dim_owners`,
  after mapping logical indices to the saved DTensor's through ``dim_map``). That fixes ``σ``,
  the coordinate over all *sharding* mesh dims ``S``, of every fragment the box overlaps. A
  fragment held by several ranks (replicated over the other mesh dims ``Q``) was written by one
  of them, chosen by a rule the save planner applies and any reader can replay
  (:func:`rule_writers`)::

      q = 0                              if replicas == 1 or the tensor's bytes per shard
                                            (nbytes // shards, integer) < rotate_min_bytes
      q = (σ_linear + t) mod replicas    otherwise

  where ``t`` is the tensor's position in the header's tensor table, ``σ_linear`` the C-order
  linear index of ``σ`` over ``S``, ``shards``/``replicas`` the products of the mesh sizes
  over ``S``/``Q``. The writer's coordinate is ``σ`` on ``S`` and the C-order unravel of ``q``
  on ``Q``; its rank is the mesh's rank table at that coordinate. Small replicated fragments
  (norm shards, scalars) all come from replica 0, so a reader touches few indexes; large ones
  rotate over the replicas, so replicated data (HSDP) is written by all of them.

A reader that does not implement this may read every index; the result is the same.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from torch_ucp.metadata.placements import (
    SHARD_KINDS,
    dim_owners,
    normalize_placements,
    sharding_mesh_dims,
)
from torch_ucp.metadata.schema import DimMap, MeshInfo, PlacementInfo, TensorEntry


def physical_shape(entry: TensorEntry) -> tuple[int, ...]:
    """The shape of the DTensor the saving ranks held (differs from the logical shape only
    where a pattern's ``dim_map`` applies)."""
    if entry.dim_map is None:
        return entry.shape
    d = entry.dim_map.dim
    return entry.shape[:d] + (entry.dim_map.physical_size,) + entry.shape[d + 1 :]


def split_dims(placements: Sequence[PlacementInfo], mesh_ndim: int) -> tuple[list[int], list[int]]:
    """``(S, Q)``: the mesh dims whose placement shards, and those that replicate."""
    s = [m for m, p in enumerate(placements) if p.kind in SHARD_KINDS]
    return s, [m for m in range(mesh_ndim) if m not in s]


def rotated_replicas(
    sigma_linear: np.ndarray, t: np.ndarray, replicas: int, small: np.ndarray
) -> np.ndarray:
    """The rule's replica index ``q`` for shards ``sigma_linear`` of tensors at table positions
    ``t`` (arrays, broadcast together); ``small``: the tensor's bytes per shard are below
    ``rotate_min_bytes``."""
    if replicas == 1:
        return np.zeros(np.broadcast(sigma_linear, t).shape, dtype=np.int64)
    return np.where(small, 0, (np.asarray(sigma_linear, dtype=np.int64) + t) % replicas)


def rule_writers(
    mesh: MeshInfo,
    placements: Sequence[PlacementInfo],
    sigma: np.ndarray,
    t: np.ndarray | int,
    nbytes: np.ndarray | int,
    rotate_min_bytes: int,
) -> np.ndarray:
    """The ranks that write the fragments of shards ``sigma`` (``[k, |S|]`` coordinates over
    the sharding mesh dims, in mesh order) of tensors at table positions ``t`` with ``nbytes``
    bytes each (scalars or arrays of ``k``): the rule of the module docstring. The save
    planner applies it; readers replay it."""
    s_dims, q_dims = split_dims(placements, len(mesh.shape))
    sigma = np.asarray(sigma, dtype=np.int64)
    if sigma.ndim == 1:
        sigma = sigma.reshape(-1, len(s_dims))
    s_shape = [mesh.shape[m] for m in s_dims]
    sigma_linear = np.ravel_multi_index(sigma.T, s_shape) if s_dims else np.zeros(len(sigma), dtype=np.int64)
    shards = math.prod(s_shape)
    small = np.asarray(nbytes, dtype=np.int64) // max(shards, 1) < rotate_min_bytes
    q = np.broadcast_to(rotated_replicas(sigma_linear, t, math.prod(mesh.shape[m] for m in q_dims), small), (len(sigma),))
    coords = np.zeros((len(sigma), len(mesh.shape)), dtype=np.int64)
    if s_dims:
        coords[:, s_dims] = sigma
    if q_dims:
        coords[:, q_dims] = np.stack(np.unravel_index(q, [mesh.shape[m] for m in q_dims]), axis=1)
    return mesh.rank_array[np.ravel_multi_index(coords.T, mesh.shape)]


def derivable(entry: TensorEntry, meshes: Sequence[MeshInfo]) -> bool:
    """Whether the writers of ``entry``'s fragments follow from its layout."""
    return (
        entry.writers is None
        and entry.mesh is not None
        and entry.placements is not None
        and meshes[entry.mesh].ranks is not None
        and entry.numel > 0
    )


def box_writers(
    entry: TensorEntry,
    t: int,
    meshes: Sequence[MeshInfo],
    rotate_min_bytes: int,
    offsets: Sequence[int],
    lengths: Sequence[int],
) -> np.ndarray | None:
    """Ranks whose indexes hold every fragment of ``entry`` overlapping the logical box, or
    ``None`` when that cannot be derived (read every index)."""
    if entry.writers is not None:
        return np.asarray(entry.writers, dtype=np.int64)
    if not derivable(entry, meshes):
        return None
    mesh = meshes[entry.mesh]
    sigma = shard_coordinates(
        physical_shape(entry), mesh.shape, entry.placements, entry.dim_map, tuple(offsets), tuple(lengths)
    )
    return np.unique(rule_writers(mesh, entry.placements, sigma, t, entry.nbytes, rotate_min_bytes))


@functools.lru_cache(maxsize=16384)
def shard_coordinates(
    shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    placements: tuple[PlacementInfo, ...],
    dim_map: DimMap | None,
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
) -> np.ndarray:
    """``σ`` of every fragment overlapping the logical box: ``[k, |S|]`` coordinates over the
    sharding mesh dims (in mesh order). Cached: tensors of one shape and layout share it."""
    placements = normalize_placements(placements, len(shape))
    intervals = [[(int(o), int(n))] for o, n in zip(offsets, lengths)]
    if dim_map is not None:
        d = dim_map.dim
        intervals[d] = [(p, n) for p, n, _ in dim_map.to_physical(offsets[d], lengths[d])]
    s_dims = [m for m, p in enumerate(placements) if p.kind in SHARD_KINDS]
    # per tensor dim: the owner keys over its sharding mesh dims, unravelled into components
    choices: list[tuple[list[int], np.ndarray]] = []
    for d, size in enumerate(shape):
        dims = list(sharding_mesh_dims(placements, d))
        if not dims:
            continue
        owners = dim_owners(size, d, mesh_shape, placements)
        keys = np.unique(np.concatenate([owners[o : o + n] for o, n in intervals[d]] or [np.zeros(0, np.int64)]))
        comps = np.stack(np.unravel_index(keys, [mesh_shape[m] for m in dims]), axis=1)
        choices.append((dims, comps))
    if not s_dims:
        return np.zeros((1, 0), dtype=np.int64)
    # Cartesian product of the per-dim choices, scattered into mesh-dim order
    grids = np.meshgrid(*[np.arange(len(c)) for _, c in choices], indexing="ij")
    picks = [g.reshape(-1) for g in grids]
    sigma = np.zeros((len(picks[0]), len(s_dims)), dtype=np.int64)
    position = {m: i for i, m in enumerate(s_dims)}
    for (dims, comps), pick in zip(choices, picks):
        for j, m in enumerate(dims):
            sigma[:, position[m]] = comps[pick, j]
    sigma.setflags(write=False)
    return sigma
