"""The shard plan is pure: permutations, contiguous cuts, determinism (property-tested)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.plan import TAR_OVERHEAD, cut_by_size, make_plan, shuffled_order
from pipeline.sources import SourceSample


@given(st.integers(0, 500), st.integers(0, 2**32))
def test_shuffle_is_a_seeded_permutation(count: int, seed: int) -> None:
    order = shuffled_order(count, seed)
    assert sorted(order.tolist()) == list(range(count))
    assert (order == shuffled_order(count, seed)).all()


@settings(max_examples=200)
@given(st.lists(st.integers(0, 5000), max_size=200), st.integers(1, 20000), st.none() | st.integers(1, 10))
def test_cuts_cover_everything_in_order_and_respect_size(sizes: list[int], limit: int, cap: int | None) -> None:
    starts = cut_by_size(sizes, limit, cap)
    ends = starts[1:] + [len(sizes)]
    assert starts == sorted(set(starts)) and (not sizes or starts[0] == 0)
    for a, b in zip(starts, ends, strict=False):  # no samples: starts=[], ends=[0]
        assert b > a, "no empty shard"
        cost = sum(s + TAR_OVERHEAD for s in sizes[a:b])
        assert cost <= limit or b - a == 1, "a shard passes the size only when one sample alone does"
        assert cap is None or b - a <= cap


def test_plan_keys_unique_and_digest_tracks_inputs() -> None:
    samples = [SourceSample(f"c{i % 3}/{i}.JPEG", i % 3, 1000 + i) for i in range(50)]
    plan = make_plan("train", samples, seed=0, shard_bytes=10_000)
    keys = [s.key for shard in plan.shards for s in shard]
    assert len(keys) == len(set(keys)) == 50 and all(k.isdigit() for k in keys)
    assert {s.relpath for shard in plan.shards for s in shard} == {s.relpath for s in samples}
    assert make_plan("train", samples, 0, 10_000).digest == plan.digest
    assert make_plan("train", samples, 1, 10_000).digest != plan.digest
    changed = samples[:-1] + [SourceSample(samples[-1].relpath, samples[-1].label, 1)]
    assert make_plan("train", changed, 0, 10_000).digest != plan.digest
