"""Load: 2 ranks x 8 reader threads streaming from the local S3 server at once, for a bounded time.
No deadlock (both finish on time), throughput stable (the second half as fast as the first, within
noise), memory bounded (RSS stops growing once the read-ahead is full); the figures are printed
(``pytest -s``) and recorded in RELIABILITY.md."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from pipeline.build import BuildConfig, build_shards
from pipeline.storage import Location
from pipeline.synthetic import write_imagenet_like

pytestmark = [pytest.mark.s3, pytest.mark.slow]

RANKS, THREADS, SECONDS = 2, 8, 20


def test_many_readers_against_the_object_store(tmp_path: Path, object_store: Any, s3_url: str) -> None:
    write_imagenet_like(tmp_path / "src", images=800, classes=8, scale=0.35)
    location = Location(s3_url, object_store.storage_options())
    build_shards(BuildConfig(src=str(tmp_path / "src" / "train"), dst=location, shard_bytes=400_000, workers=2))
    env = {**os.environ, **object_store.env(), "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.load_reader", s3_url, "--rank", str(rank), "--world",
                               str(RANKS), "--threads", str(THREADS), "--seconds", str(SECONDS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(RANKS)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=SECONDS + 90)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a reader did not finish in time: deadlock or stall")
        assert proc.returncode == 0, err[-3000:]
        outputs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])

    print(f"\nload: {RANKS} ranks x {THREADS} threads, {SECONDS} s against moto S3 on 127.0.0.1")
    print(f"{'rank':>4} {'samples/s':>10} {'1st half':>9} {'2nd half':>9} {'RSS@25%':>8} {'RSS end':>8} "
          f"{'peak RSS':>9} {'max gap':>8} {'retries':>7}")
    for rank, lines in enumerate(outputs):
        ticks, summary = lines[:-1], lines[-1]
        assert summary["summary"] and summary["corrupt_samples"] == 0 and summary["unreadable_pieces"] == 0
        assert summary["max_gap_s"] < 10, f"rank {rank} stalled: {summary['max_gap_s']} s without a sample"
        assert len(ticks) >= 6
        rates = [(b["samples"] - a["samples"]) / (b["t"] - a["t"]) for a, b in pairwise(ticks)]
        half = len(rates) // 2
        first, second = statistics.median(rates[1:half]), statistics.median(rates[half:])
        quarter = ticks[len(ticks) // 4]["rss_mb"]
        print(f"{rank:>4} {summary['samples'] / summary['seconds']:>10.0f} {first:>9.0f} {second:>9.0f} "
              f"{quarter:>8.0f} {ticks[-1]['rss_mb']:>8.0f} {summary['peak_rss_mb']:>9.0f} "
              f"{summary['max_gap_s']:>7.2f}s {summary['read_retries']:>7}")
        assert second >= 0.5 * first, f"rank {rank} slowed down: {first:.0f} -> {second:.0f} samples/s"
        assert ticks[-1]["rss_mb"] - quarter < 100, f"rank {rank} memory keeps growing: {quarter} -> {ticks[-1]}"
        assert summary["peak_rss_mb"] < 1024
        assert summary["samples"] > 800, "each rank should go through its share several times"
