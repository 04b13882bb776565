"""A content hash of a logical tensor that does not depend on how the tensor was cut.

Every element contributes a term that depends only on its *global* linear index ``i`` (C order
over the tensor's logical shape) and its bits; the hash is the sum of the terms modulo 2^64.
Sums add up in any order, so each rank hashes the fragments it writes (or the shards it loaded),
and the partial sums of any layout, added together, give the same value::

    H(T) = sum over elements i of  x(w_i) * R(i)   (mod 2^64)

- ``w_i``: the element's bytes as a little-endian unsigned integer (1, 2, 4 or 8 bytes; ``bool``
  one byte). A 16-byte element (``complex128``) is two 8-byte words, hashed as elements ``2i``
  and ``2i + 1`` of the same tensor with its last dimension doubled.
- ``x(w) = w`` for elements of up to 4 bytes, ``w ^ (w >> 32)`` for 8-byte words (so that changes
  of the high bits do not vanish modulo 2^64).
- ``R(i) = T(i mod 2^16) * U(i >> 16)`` (mod 2^64): an odd pseudo-random multiplier per index,
  from two tables of ``fmix64`` (MurmurHash3's 64-bit finalizer) values made odd:
  ``T(j) = fmix64(j + 0x9E3779B97F4A7C15) | 1``, ``U(k) = fmix64(k + 0xD6E8FEB86659FD93) | 1``.

Every ``R(i)`` is odd, so a change of one element always changes the hash (``Δx * R(i)`` is not
0 modulo 2^64); a wrong placement (two fragments swapped, a region shifted) or several changed
elements are missed only if their differences weighted by pseudo-random multipliers cancel,
about 2^-64 for unstructured changes (2^-32 at worst for structured ones such as flipping the
sign bits of a chosen pair of elements). It is a check against bugs and damage, not a
cryptographic hash. docs/FORMAT.md specifies it for other-language readers.

Cost: one multiply, one add and a widening copy per element, in numpy blocks of 2^16 elements
with the table slice in cache (``benchmarks/compare.py`` reports GB/s per core).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from torch_ucp.metadata.raw_bytes import tensor_bytes

ALGORITHM = "mlh64"
"""The header's name for this hash (``content_hash.algorithm``)."""

MASK = (1 << 64) - 1
BLOCK_BITS = 16
BLOCK = 1 << BLOCK_BITS
T_SEED = 0x9E3779B97F4A7C15
U_SEED = 0xD6E8FEB86659FD93
_M1, _M2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53
_SHORT_RUN = BLOCK  # runs shorter than this are hashed many at a time
_BATCH = 1 << 16  # elements per vectorized step


def fmix64(x: int) -> int:
    """MurmurHash3's 64-bit finalizer."""
    x &= MASK
    x ^= x >> 33
    x = (x * _M1) & MASK
    x ^= x >> 33
    x = (x * _M2) & MASK
    return x ^ (x >> 33)


def _fmix64_array(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(33)
    x *= np.uint64(_M1)
    x ^= x >> np.uint64(33)
    x *= np.uint64(_M2)
    x ^= x >> np.uint64(33)
    return x


def _u_table(ks: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _fmix64_array(ks.astype(np.uint64) + np.uint64(U_SEED)) | np.uint64(1)


with np.errstate(over="ignore"):
    _T = _fmix64_array(np.arange(BLOCK, dtype=np.uint64) + np.uint64(T_SEED)) | np.uint64(1)
_T.setflags(write=False)


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def words_of(data: np.ndarray | memoryview | bytes, itemsize: int) -> np.ndarray:
    """The elements of C-contiguous raw bytes as unsigned words (16-byte elements as two)."""
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    word = _WORDS[min(itemsize, 8)]
    return raw.view(word)


class _Scratch:
    """Reusable 2^16-element work buffers (one set per call: calls may run in threads)."""

    def __init__(self) -> None:
        self.x = np.empty(_BATCH, dtype=np.uint64)
        self.t = np.empty(_BATCH, dtype=np.uint64)


def box_hash(
    words: np.ndarray,
    offsets: Sequence[int],
    lengths: Sequence[int],
    shape: Sequence[int],
    itemsize: int,
) -> int:
    """The partial hash of a box of a tensor: ``words`` are the box's elements in C order (as
    :func:`words_of` returns them), the box is at ``offsets`` with ``lengths`` in a tensor of
    ``shape`` and element size ``itemsize``."""
    offsets, lengths, shape = list(offsets), list(lengths), list(shape)
    if itemsize == 16:  # two 8-byte words per element: the last dim doubles
        if not shape:
            offsets, lengths, shape = [0], [1], [1]
        offsets[-1], lengths[-1], shape[-1] = 2 * offsets[-1], 2 * lengths[-1], 2 * shape[-1]
    n = math.prod(lengths)
    if n == 0:
        return 0
    if words.size != n:
        raise ValueError(f"a box of {lengths} has {n} elements, got {words.size} words")
    wide = words.dtype.itemsize == 8
    # runs: the box is contiguous in the tensor over its trailing dims that are whole
    q = len(shape) - 1
    while q > 0 and offsets[q] == 0 and lengths[q] == shape[q]:
        q -= 1
    inner = math.prod(shape[q + 1 :])
    run = lengths[q] * inner if shape else 1
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    lead = lengths[:q]
    base = sum(o * s for o, s in zip(offsets, strides)) if shape else 0
    scratch = _Scratch()
    flat = words.reshape(-1)
    total = 0
    if run >= _SHORT_RUN or not lead:
        for r, index in enumerate(np.ndindex(*lead)):
            start = base + sum(i * strides[d] for d, i in enumerate(index))
            total += _run_hash(flat[r * run : (r + 1) * run], start, wide, scratch)
        return total & MASK
    # many short runs (< 2^16 elements): batches of runs, each run's multipliers a row of
    # consecutive table entries (one block change at most per run, handled apart)
    starts = np.full(1, base, dtype=np.int64)
    for d, n_d in enumerate(lead):
        starts = (starts[:, None] + np.arange(n_d, dtype=np.int64)[None, :] * strides[d]).reshape(-1)
    per = max(1, _BATCH // run)
    window = np.lib.stride_tricks.sliding_window_view(_wrapped_table(run), run)
    for r0 in range(0, len(starts), per):
        s = starts[r0 : r0 + per]
        x = flat[r0 * run : (r0 + len(s)) * run].reshape(len(s), run).astype(np.uint64)
        total += _runs_hash(x, s, run, window, wide)
    return total & MASK


def _wrapped_table(run: int) -> np.ndarray:
    """``T`` followed by its first ``run`` entries: row ``j`` of its sliding window of width
    ``run`` holds the table entries of indices ``j, j + 1, ...`` modulo 2^16."""
    return np.concatenate([_T, _T[:run]])


def _runs_hash(x: np.ndarray, starts: np.ndarray, run: int, window: np.ndarray, wide: bool) -> int:
    """Sum of ``x(w) * R(i)`` over runs ``x[r]`` of global indices ``starts[r] + [0, run)``."""
    if wide:
        x ^= x >> np.uint64(32)
    j0 = starts & (BLOCK - 1)
    ks = starts >> BLOCK_BITS
    x *= window[j0]
    sums = x.sum(axis=1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        total = int((sums * _u_table(ks)).sum(dtype=np.uint64))
    # runs that cross into the next block: their tail takes U(k + 1), not U(k)
    for r in np.flatnonzero(j0 + run > BLOCK).tolist():
        cut = BLOCK - int(j0[r])
        tail = int(x[r, cut:].sum(dtype=np.uint64))
        k = int(ks[r])
        total += tail * ((fmix64(k + 1 + U_SEED) | 1) - (fmix64(k + U_SEED) | 1))
    return total & MASK


def _premix(x: np.ndarray, t: np.ndarray) -> None:
    np.right_shift(x, np.uint64(32), out=t)
    np.bitwise_xor(x, t, out=x)


def _run_hash(words: np.ndarray, start: int, wide: bool, s: _Scratch) -> int:
    """Sum of ``x(w) * R(i)`` over a contiguous run of global indices from ``start``."""
    total = 0
    pos = 0
    n = words.size
    while pos < n:
        i = start + pos
        k, j = i >> BLOCK_BITS, i & (BLOCK - 1)
        m = min(n - pos, BLOCK - j)
        x, t = s.x[:m], s.t[:m]
        np.copyto(x, words[pos : pos + m], casting="unsafe")
        if wide:
            _premix(x, t)
        np.multiply(x, _T[j : j + m], out=x)
        u = fmix64(k + U_SEED) | 1
        total += int(x.sum(dtype=np.uint64)) * u
        pos += m
    return total & MASK


def tensor_hash(
    tensor: torch.Tensor, offsets: Sequence[int], shape: Sequence[int]
) -> int:
    """The partial hash of ``tensor``, the box at ``offsets`` of a tensor of ``shape`` (any
    strides and dtype; copied to CPU and made contiguous where needed)."""
    if tensor.numel() == 0:
        return 0
    itemsize = tensor.dtype.itemsize
    return box_hash(words_of(tensor_bytes(tensor), itemsize), offsets, tuple(tensor.shape), shape, itemsize)


def bytes_hash(
    data: memoryview | bytes,
    itemsize: int,
    offsets: Sequence[int],
    lengths: Sequence[int],
    shape: Sequence[int],
) -> int:
    """The partial hash of a fragment's raw C-contiguous bytes (as the writer streams them)."""
    if not len(data):
        return 0
    return box_hash(words_of(data, itemsize), offsets, lengths, shape, itemsize)


@dataclass
class PartialHashes:
    """One rank's partial hashes, as two columns: the tensor key of each tensor it hashed
    (:func:`~torch_ucp.metadata.fragments.tensor_key`) and its partial sum; 16 bytes per tensor
    on the wire."""

    keys: np.ndarray  # uint64
    sums: np.ndarray  # uint64

    @classmethod
    def of(cls, sums: dict[str, int]) -> PartialHashes:
        from torch_ucp.metadata.fragments import tensor_key

        return cls(
            np.array([tensor_key(f) for f in sums], dtype=np.uint64),
            np.array([v & MASK for v in sums.values()], dtype=np.uint64),
        )

    @staticmethod
    def total(parts: Sequence[PartialHashes]) -> dict[int, int]:
        """Every tensor key's sum over ``parts``, modulo 2^64."""
        keys = np.concatenate([p.keys for p in parts]) if parts else np.zeros(0, np.uint64)
        sums = np.concatenate([p.sums for p in parts]) if parts else np.zeros(0, np.uint64)
        unique, inverse = np.unique(keys, return_inverse=True)
        totals = np.zeros(len(unique), dtype=np.uint64)
        np.add.at(totals, inverse, sums)  # uint64 addition wraps: the sum modulo 2^64
        return dict(zip(unique.tolist(), totals.tolist()))


def add(a: int, b: int) -> int:
    """Partial hashes combine by addition modulo 2^64."""
    return (a + b) & MASK


def to_hex(value: int) -> str:
    """The header's form of a hash: 16 lowercase hex digits."""
    return f"{value & MASK:016x}"


__all__ = [
    "ALGORITHM",
    "PartialHashes",
    "box_hash",
    "bytes_hash",
    "tensor_hash",
    "to_hex",
    "words_of",
]
