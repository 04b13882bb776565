"""Range-read planning (torch_ucp.storage.ranges): which bytes of a fragment a box read fetches.

Over random fragments (1-4 dims), boxes inside them, element sizes and waste ratios:

- the plan reads the box: the ranges, packed in order and viewed through ``view_strides`` /
  ``view_offset``, are exactly the box's elements (checked on random bytes);
- the ranges lie inside the fragment, in increasing order, without overlap;
- the waste bound holds: the bytes read are at most ``(1 + waste_ratio)`` times the box's bytes;
- the plan has the fewest ranges within that bound: it equals the plan of a model that, for
  each number of leading dimensions to enumerate, reads from the first to the last element of
  every sub-box (listing the elements one by one) and takes the first that fits.

``block_aligned_bounds``: the widened range holds the request, starts on a block, ends on one
or at the fragment's end, and widens by less than a block on either side.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_ucp.storage.ranges import block_aligned_bounds, c_strides, plan_box_ranges

# Generation may be slow on a loaded CI machine; the examples are few and fixed in number.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64]


@st.composite
def box_reads(draw, min_length: int = 0):
    """(fragment_shape, offsets, lengths, dtype, waste_ratio) with the box inside the fragment."""
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    offsets, lengths = [], []
    for s in shape:
        o = draw(st.integers(0, s - min_length))
        offsets.append(o)
        lengths.append(draw(st.integers(min_length, s - o)))
    dtype = draw(st.sampled_from(DTYPES))
    waste = draw(st.one_of(st.just(0.0), st.floats(0.0, 4.0), st.just(math.inf)))
    return shape, offsets, lengths, dtype, waste


def box_elements(shape, offsets, lengths) -> np.ndarray:
    """Linear element indices of the box in the C-contiguous fragment, in C order."""
    grids = np.meshgrid(*(np.arange(o, o + n) for o, n in zip(offsets, lengths)), indexing="ij")
    return (
        np.ravel_multi_index([g.reshape(-1) for g in grids], shape)
        if grids
        else np.zeros(0, np.int64)
    )


def model_range_count(shape, offsets, lengths, waste: float) -> int:
    """How many ranges the fewest-ranges plan within the waste bound has, by enumeration."""
    needed = math.prod(lengths)
    elements = box_elements(shape, offsets, lengths).reshape(lengths)
    for d in range(len(shape) + 1):
        subs = elements.reshape(math.prod(lengths[:d]), -1)  # one row per leading index tuple
        read = int((subs.max(axis=1) - subs.min(axis=1) + 1).sum())
        if read <= (1 + waste) * needed or d == len(shape):
            return subs.shape[0]
    raise AssertionError("unreachable")


@settings(PROPERTY, max_examples=150)
@given(box_reads(min_length=1))
def test_plan_reads_exactly_the_box_within_the_waste_bound(read):
    shape, offsets, lengths, dtype, waste = read
    itemsize = torch.empty((), dtype=dtype).element_size()
    fragment = (
        torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8)
        .view(dtype)
        .reshape(shape)
    )
    plan = plan_box_ranges(shape, offsets, lengths, itemsize, waste)
    frag_bytes = fragment.numel() * itemsize
    needed = math.prod(lengths) * itemsize
    starts = [int(s) for s in plan.starts]

    assert starts and plan.span > 0 and plan.span % itemsize == 0
    assert all(s % itemsize == 0 for s in starts)  # ranges start on elements
    assert 0 <= starts[0] and starts[-1] + plan.span <= frag_bytes  # inside the fragment
    assert all(a + plan.span <= b for a, b in zip(starts, starts[1:]))  # increasing, disjoint
    assert plan.total == len(starts) * plan.span
    assert needed <= plan.total <= (1 + waste) * needed * (1 + 1e-12)

    data = fragment.reshape(-1).view(torch.uint8)
    packed = torch.cat([data[s : s + plan.span] for s in starts])
    view = packed.view(dtype).as_strided(tuple(lengths), plan.view_strides, plan.view_offset)
    box = fragment[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
    assert torch.equal(view, box)


@settings(PROPERTY, max_examples=150)
@given(box_reads(min_length=1))
def test_plan_has_the_fewest_ranges_within_the_bound(read):
    shape, offsets, lengths, dtype, waste = read
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_box_ranges(shape, offsets, lengths, itemsize, waste)
    assert len(plan.starts) == model_range_count(shape, offsets, lengths, waste)


@settings(PROPERTY, max_examples=100)
@given(box_reads(min_length=1))
def test_no_waste_reads_the_box_bytes_and_nothing_else(read):
    shape, offsets, lengths, dtype, _ = read
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_box_ranges(shape, offsets, lengths, itemsize, 0.0)
    read_bytes = np.concatenate([np.arange(s, s + plan.span) for s in plan.starts])
    box_bytes = (
        box_elements(shape, offsets, lengths)[:, None] * itemsize + np.arange(itemsize)
    ).reshape(-1)
    assert np.array_equal(np.sort(read_bytes), np.sort(box_bytes))


@settings(PROPERTY, max_examples=100)
@given(box_reads(min_length=1))
def test_unbounded_waste_reads_first_to_last_element_in_one_range(read):
    shape, offsets, lengths, dtype, _ = read
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_box_ranges(shape, offsets, lengths, itemsize, math.inf)
    elements = box_elements(shape, offsets, lengths)
    assert [int(s) for s in plan.starts] == [int(elements.min()) * itemsize]
    assert plan.span == (int(elements.max()) - int(elements.min()) + 1) * itemsize


@settings(PROPERTY, max_examples=100)
@given(box_reads(min_length=0))
def test_an_empty_box_reads_nothing(read):
    shape, offsets, lengths, dtype, waste = read
    if math.prod(lengths):
        lengths[0] = 0
    plan = plan_box_ranges(shape, offsets, lengths, 4, waste)
    assert plan.starts.size == 0 and plan.total == 0


def test_module_docstring_example():
    """Fragment 4 x 8, box rows 1..2, cols 2..5 (float32)."""
    loose = plan_box_ranges((4, 8), (1, 2), (2, 4), 4, 1.0)  # 12 elements for 8: within 2x
    assert loose.starts.tolist() == [(8 + 2) * 4] and loose.span == 12 * 4
    exact = plan_box_ranges((4, 8), (1, 2), (2, 4), 4, 0.0)
    assert exact.starts.tolist() == [(8 + 2) * 4, (16 + 2) * 4] and exact.span == 4 * 4


def test_c_strides():
    assert c_strides((4, 8)) == (8, 1)
    assert c_strides((2, 3, 5)) == (15, 5, 1)
    assert c_strides((7,)) == (1,)
    assert c_strides(()) == ()


@settings(PROPERTY, max_examples=300)
@given(
    st.integers(1, 4096), st.integers(0, 1 << 20), st.integers(1, 1 << 16), st.integers(0, 1 << 16)
)
def test_block_aligned_bounds_widen_to_whole_blocks_within_the_fragment(
    block, start, length, slack
):
    end = start + length
    limit = end + slack
    lo, hi = block_aligned_bounds(start, end, block, limit)
    assert 0 <= lo <= start and end <= hi <= limit  # the request is inside, the result too
    assert lo % block == 0 and (hi % block == 0 or hi == limit)  # whole blocks, or the end
    assert start - lo < block and (hi - end < block)  # never a whole block more than needed
    assert hi == min(limit, math.ceil(end / block) * block)


@pytest.mark.parametrize(
    "start, end, block, limit, expected",
    [
        (0, 10, 4, 100, (0, 12)),
        (5, 8, 4, 100, (4, 8)),
        (9, 10, 4, 10, (8, 10)),
        (8, 12, 4, 12, (8, 12)),
    ],
)
def test_block_aligned_bounds_examples(start, end, block, limit, expected):
    assert block_aligned_bounds(start, end, block, limit) == expected
