"""The same build, inspect and stream through a real S3-protocol server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.build import BuildConfig, build_shards
from pipeline.config import StreamConfig
from pipeline.inspect import inspect
from pipeline.manifest import DatasetError, read_info
from pipeline.order import stream_rows
from pipeline.storage import Location
from pipeline.stream import SampleStream, ShardSet
from tests.imagetree import Tree
from tests.test_build import check_round_trip

pytestmark = pytest.mark.s3


def test_build_inspect_and_stream_through_s3(tree: Tree, object_store, s3_url: str) -> None:
    location = Location(s3_url, object_store.storage_options())
    info = build_shards(BuildConfig(src=str(tree.root), dst=location, shard_bytes=20_000, workers=2,
                                    max_bad=0.5)).info
    fs, root = location.fs_and_path()
    fs.invalidate_cache()
    check_round_trip(tree, fs, root)
    assert not fs.exists(f"{root}/_build/train")
    result = inspect(location)
    assert result.ok, result.problems
    shards = ShardSet.open(location, "train", expect_fingerprint=info["fingerprint"])
    stream = SampleStream(shards, StreamConfig(shuffle_buffer=6, seed=2), world=2, rank=1, threads=3)
    rows = [s.row for s in stream.take(40)]
    assert rows == stream_rows(shards.counts, 2, 2, 1, 6, 0, 40).tolist()
    per_view = stream.metrics.bytes_read / 40
    assert per_view < 1.2 * shards.sizes.mean() + 1024 * 2, "a rank reads its own byte ranges, not whole shards"


def test_cli_takes_credentials_from_the_environment_and_never_prints_them(tree: Tree, object_store,
                                                                          s3_url: str) -> None:
    secret = "SENTINEL-S3-SECRET-7f3a9c"  # moto accepts any key; a unique one can be searched for
    env = {**os.environ, **object_store.env(), "AWS_SECRET_ACCESS_KEY": secret, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "pipeline.cli"]
    build = subprocess.run([*cli, "-v", "build-shards", "--src", str(tree.root), "--dst", s3_url, "--max-bad", "0.5",
                            "--workers", "1"], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    check = subprocess.run([*cli, "inspect", s3_url], env=env, capture_output=True, text=True)
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    for text in (build.stdout, build.stderr, check.stdout, check.stderr):
        assert secret not in text


def test_a_bucket_that_does_not_exist_is_named_as_such(object_store) -> None:
    with pytest.raises(DatasetError, match=r"s3://no-such-bucket/x: nothing is there \(no such folder or bucket"):
        read_info(Location("s3://no-such-bucket/x", object_store.storage_options()), "train")
