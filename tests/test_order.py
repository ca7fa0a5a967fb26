"""Sample order properties, for any shard layout, world size and window (property-tested)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.order import per_rank, rank_pieces, rank_windows, stream_rows, window_samples

layouts = st.lists(st.integers(1, 40), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(layouts, st.integers(1, 5), st.integers(0, 3), st.integers(0, 2**31))
def test_ranks_are_disjoint_equal_and_cover_all_but_the_remainder(counts, world, pass_index, seed) -> None:
    total = sum(counts)
    if total < world:
        return
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    seen = []
    for rank in range(world):
        pieces = rank_pieces(counts, seed, pass_index, world, rank)
        rows = [starts[p.shard] + i for p in pieces for i in range(p.start, p.stop)]
        assert len(rows) == per_rank(counts, world), "every rank reads the same number of images"
        seen.extend(rows)
    assert len(seen) == len(set(seen)), "ranks are disjoint"
    assert len(seen) == total - total % world


@settings(max_examples=100, deadline=None)
@given(layouts, st.integers(1, 3), st.integers(1, 50), st.integers(0, 2**31))
def test_windows_are_permutations_of_the_rank_range(counts, world, window, seed) -> None:
    if sum(counts) < world:
        return
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for rank in range(world):
        pieces = rank_pieces(counts, seed, 0, world, rank)
        expected = sorted(starts[p.shard] + i for p in pieces for i in range(p.start, p.stop))
        windows = rank_windows(counts, seed, 0, world, rank, window)
        assert all(len(w) <= window for w in windows)
        rows = np.concatenate([window_samples(w, starts) for w in windows])
        assert sorted(rows.tolist()) == expected


@settings(max_examples=60, deadline=None)
@given(layouts, st.integers(1, 3), st.integers(1, 30), st.integers(0, 200), st.integers(1, 120))
def test_resuming_at_any_position_continues_the_same_stream(counts, world, window, cut, length) -> None:
    if sum(counts) < world:
        return
    whole = stream_rows(counts, 7, world, 0, window, 0, cut + length)
    assert (stream_rows(counts, 7, world, 0, window, cut, length) == whole[cut:]).all()


def test_passes_differ_and_each_pass_uses_every_image_once() -> None:
    counts = [10] * 12
    n = per_rank(counts, 1)
    first = stream_rows(counts, 0, 1, 0, 16, 0, n)
    second = stream_rows(counts, 0, 1, 0, 16, n, n)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(120))
    assert (first != second).any(), "a new pass is a new order"
    assert (stream_rows(counts, 1, 1, 0, 16, 0, n) != first).any(), "the seed changes the order"
