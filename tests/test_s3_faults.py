"""Streaming through a fault-injecting proxy in front of the S3-protocol server (moto) on 127.0.0.1.

Throttling and 5xx answers are retried with backoff; a connection dropped mid-shard is resumed at the
chunk where it broke, never re-reading bytes already received; a shard that never answers is skipped,
counted and substituted while the run goes on; most shards failing stops the run with a clear error.

s3fs and botocore retry some errors themselves. Here both are set to a single attempt (s3fs's
``retries`` is a class attribute, not a storage option; botocore's is ``config_kwargs``), so that every
fault reaches the stream's own retry layer, which is what these tests are about, and they stay fast.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from pipeline.build import BuildConfig, build_shards
from pipeline.config import StreamConfig
from pipeline.order import rank_windows, stream_rows
from pipeline.storage import Location
from pipeline.stream import PieceReader, Sample, SampleStream, ShardSet, StreamError, StreamMetrics
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures_infra import BUCKET
from tests.imagetree import make_tree

pytestmark = pytest.mark.s3

CHUNK = 4096  # bytes per request: a shard (~20 kB) spans several


@pytest.fixture(scope="module")
def dataset(object_store, tmp_path_factory: pytest.TempPathFactory) -> str:
    """48 real JPEGs in ~6 shards on the object store, written directly (not through the proxy)."""
    root = tmp_path_factory.mktemp("faults")
    tree = make_tree(root / "src", num_classes=4, per_class=12, defects=False, size_range=(40, 90))
    url = f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:12]}"
    build_shards(BuildConfig(src=str(tree.root), dst=Location(url, object_store.storage_options()),
                             shard_bytes=20_000, workers=1))
    return url


@pytest.fixture(scope="module")
def clean(dataset: str, object_store) -> dict[int, tuple[str, bytes]]:
    """Manifest row -> (key, image bytes), read straight from the store (no proxy, no faults)."""
    samples = read_all(direct(object_store, dataset), config(), StreamMetrics())
    return {row: (s.key, s.data) for row, s in samples.items()}


@pytest.fixture
def proxy(object_store, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setattr(S3FileSystem, "retries", 1)  # s3fs's own retry loop: one attempt
    proxy = FaultProxy(object_store.endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert not proxy.running, "the proxy thread is gone"


def through(proxy: FaultProxy, object_store, url: str) -> ShardSet:
    options = {**object_store.storage_options(), "endpoint_url": proxy.url,
               "config_kwargs": {"retries": {"total_max_attempts": 1}}}  # botocore's own retries: off
    return ShardSet.open(Location(url, options), "train")


def direct(object_store, url: str) -> ShardSet:
    return ShardSet.open(Location(url, object_store.storage_options()), "train")


def config(**overrides) -> StreamConfig:
    return StreamConfig(**{"shuffle_buffer": 8, "seed": 3, "read_chunk_bytes": CHUNK, "max_read_retries": 3,
                           **overrides})


def read_all(shards: ShardSet, cfg: StreamConfig, metrics: StreamMetrics) -> dict[int, Sample]:
    """Every sample, shard by shard, one piece per shard, no threads."""
    reader = PieceReader(shards, cfg, metrics)
    out: dict[int, Sample] = {}
    for shard, count in enumerate(shards.counts):
        out.update(reader.read(shard, 0, int(count)))
    return out


def unreadable(metrics: StreamMetrics) -> int:
    return sum(n for reason, n in metrics.reasons.items() if reason.startswith("unreadable shard"))


def test_read_chunk_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"stream.read_chunk_bytes=0: must be >= 1"):
        StreamConfig(read_chunk_bytes=0)


def test_throttling_and_5xx_are_retried_and_the_samples_are_those_of_a_clean_read(dataset: str, object_store,
                                                                                 clean, proxy: FaultProxy) -> None:
    shards = through(proxy, object_store, dataset)
    assert len(shards.shard_names) >= 4 and len(shards) == len(clean) == 48
    faults = [Fault(".tar", "slowdown", times=3), Fault(".tar", "internal", skip=6, times=2),
              Fault(".tar", "slowdown", skip=11, times=1)]
    proxy.add(*faults)
    # enough retries even if every fault lands on the same chunk, however the threads interleave
    cfg = config(max_read_retries=sum(f.times for f in faults))
    stream = SampleStream(shards, cfg, threads=2)
    got = stream.take(len(shards))
    planned = stream_rows(shards.counts, cfg.seed, 1, 0, cfg.shuffle_buffer, 0, len(shards))
    assert [(s.key, s.data) for s in got] == [clean[int(row)] for row in planned]
    faulted = [r for r in proxy.requests(".tar") if r.fault]
    assert sorted((r.fault, r.status) for r in faulted) == [("internal", 500)] * 2 + [("slowdown", 503)] * 4
    m = stream.metrics
    assert m.read_retries == len(faulted), "every fault is retried once, by the stream"
    assert m.unreadable_pieces == m.substituted == m.corrupt_samples == 0


def test_a_connection_dropped_mid_shard_resumes_at_the_chunk_where_it_broke(dataset: str, object_store, clean,
                                                                           proxy: FaultProxy) -> None:
    shards = through(proxy, object_store, dataset)
    names = list(shards.shard_names.values())
    for name in names:  # each shard's second request breaks after 1000 of its 4096 bytes
        proxy.add(Fault(name, "drop", skip=1, times=1, after_bytes=1000))
    metrics = StreamMetrics()
    got = read_all(shards, config(), metrics)
    assert {r: (s.key, s.data) for r, s in got.items()} == clean
    assert len(got) == len(shards) and metrics.read_retries == len(names)
    for name in names:
        gets = proxy.requests(name, "GET")
        ranges = [r.byte_range for r in gets]
        assert len(ranges) >= 4, f"{name}: the piece spans several chunks"
        assert [r.fault for r in gets] == [None, "drop"] + [None] * (len(gets) - 2)
        assert ranges[2] == ranges[1], "the retry asks for the chunk that broke"
        assert ranges[2][0] == ranges[0][1] > ranges[0][0], "from where the first chunk ended, not the piece start"
        once = ranges[:2] + ranges[3:]
        assert all(a[1] == b[0] for a, b in zip(once, once[1:], strict=False)), "no byte is fetched twice"
        assert all(end - start <= CHUNK for start, end in ranges)
    assert metrics.bytes_read == sum(end - start for r in proxy.requests(".tar") if r.fault is None
                                     for start, end in [r.byte_range])


def test_shard_cache_fills_through_dropped_connections(dataset: str, object_store, clean, proxy: FaultProxy,
                                                       tmp_path: Path) -> None:
    shards = through(proxy, object_store, dataset)
    proxy.add(Fault(".tar", "drop", skip=2, times=3, after_bytes=100))
    metrics = StreamMetrics()
    got = read_all(shards, config(shard_cache_dir=str(tmp_path / "cache")), metrics)
    assert {r: (s.key, s.data) for r, s in got.items()} == clean
    assert metrics.read_retries == 3
    fs, root = direct(object_store, dataset).location.fs_and_path()
    cached = {p.name: p.read_bytes() for p in (tmp_path / "cache").rglob("*.tar")}
    assert cached.keys() == set(shards.shard_names.values())
    assert all(data == fs.cat_file(f"{root}/{name}") for name, data in cached.items())


def test_one_shard_failing_for_good_is_skipped_counted_and_the_run_goes_on(dataset: str, object_store,
                                                                         proxy: FaultProxy) -> None:
    shards = through(proxy, object_store, dataset)
    cfg, world = config(max_read_retries=2, shuffle_buffer=4), 2
    # the worst case: rank 0's first window lies wholly in the bad shard, so no earlier window has samples
    # to substitute (one reader thread, so no later window has finished first either)
    first = rank_windows(shards.counts, cfg.seed, 0, world, 0, cfg.shuffle_buffer)[0]
    assert len(first.pieces) == 1 and len(first) == cfg.shuffle_buffer
    bad = first.pieces[0].shard
    proxy.add(Fault(shards.shard_names[bad], "internal", times=None))
    for rank in range(world):
        stream = SampleStream(shards, cfg, world, rank, threads=1)
        planned = stream_rows(shards.counts, cfg.seed, world, rank, cfg.shuffle_buffer, 0, stream.per_rank + 8)
        got = stream.take(len(planned))  # a pass and the start of the next one: the run goes on
        assert len(got) == len(planned), "the rank yields its planned count"
        lost = 0
        for row, sample in zip(planned, got, strict=True):
            if shards.shards[row] == bad:
                lost += 1
                assert shards.shards[sample.row] != bad, "a sample of the bad shard is replaced by a good one"
            else:
                assert sample.row == row, "every other sample is where the plan puts it"
        m = stream.metrics
        assert lost > 0 or rank == 1
        assert m.substituted >= lost and unreadable(m) >= lost and m.unreadable_pieces >= (lost > 0)
        assert set(m.reasons) <= {r for r in m.reasons if r.startswith("unreadable shard")}
    assert all(r.status == 500 for r in proxy.requests(shards.shard_names[bad], "GET"))


def test_most_shards_failing_stops_the_run_with_a_clear_error(dataset: str, object_store,
                                                             proxy: FaultProxy) -> None:
    shards = through(proxy, object_store, dataset)
    names = sorted(shards.shard_names.values())
    for name in names[1:]:
        proxy.add(Fault(name, "slowdown", times=None))
    stream = SampleStream(shards, config(max_read_retries=1), threads=2)
    with pytest.raises(StreamError, match=re.escape(dataset)) as error:
        stream.take(len(shards))
    message = str(error.value)
    assert "unreadable" in message and "endpoint" in message and f"pipeline inspect {dataset}" in message
    assert stream.metrics.unreadable_pieces >= 2


@pytest.mark.dali
def test_eval_pass_skips_a_dead_shard_and_stops_when_most_are(dataset: str, object_store, proxy: FaultProxy) -> None:
    """The val pass reads shard by shard: one shard that never answers is skipped and counted, every other
    sample is evaluated once; with most shards dead the pass stops with the stream's clear error."""
    from pipeline.config import AugmentConfig, DataConfig
    from pipeline.loader import EvalLoader

    shards = through(proxy, object_store, dataset)
    names = sorted(shards.shard_names.values())
    dead = next(i for i, n in shards.shard_names.items() if n == names[0])
    proxy.add(Fault(names[0], "slowdown", times=None))
    data = DataConfig(batch_size=8, augment=AugmentConfig(image_size=32), stream=config(max_read_retries=1))
    loader = EvalLoader(shards, data, batch_size=8, dali_threads=1)
    keys = [key for _, _, batch_keys in loader for key in batch_keys]
    assert sorted(keys) == sorted(shards.keys[shards.shards != dead])
    assert loader.metrics.unreadable_pieces == 1
    unreadable = {k: v for k, v in loader.metrics.reasons.items() if k.startswith("unreadable shard: ")}
    assert sum(unreadable.values()) == (shards.shards == dead).sum()  # each skipped sample counted, by reason

    for name in names[1:]:
        proxy.add(Fault(name, "slowdown", times=None))
    with pytest.raises(StreamError, match=re.escape(f"pipeline inspect {dataset}")):
        for _ in EvalLoader(shards, data, batch_size=8, dali_threads=1):
            pass
