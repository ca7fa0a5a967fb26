"""One rank of the load test (``tests/test_load.py``): streams its share of a split for a fixed time with
many reader threads and prints a JSON line per second (samples so far, RSS) and a summary at the end.

    python -m tests.load_reader URL --rank 0 --world 2 --threads 8 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from pipeline.config import StreamConfig
from pipeline.storage import Location
from pipeline.stream import SampleStream, ShardSet


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM of its address space). Not ``ru_maxrss``: Linux carries that
    over from the parent across fork + exec, so a reader started by a big pytest process would report the
    parent's peak (CI saw 1.4 GB for a reader whose RSS never passed 200 MB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--window", type=int, default=64)
    args = p.parse_args(argv)
    shards = ShardSet.open(Location(args.url), "train")
    stream = SampleStream(shards, StreamConfig(shuffle_buffer=args.window, seed=args.rank), world=args.world,
                          rank=args.rank, threads=args.threads)
    start = last = time.monotonic()
    count, prev, max_gap = 0, start, 0.0
    for sample in stream:
        count += 1
        assert sample.data[:2] == b"\xff\xd8"
        now = time.monotonic()
        max_gap, prev = max(max_gap, now - prev), now
        if now - last >= 1.0:
            print(json.dumps({"t": round(now - start, 2), "samples": count, "rss_mb": round(_rss_mb(), 1)}),
                  flush=True)
            last = now
        if now - start >= args.seconds:
            break
    peak = _peak_rss_mb()
    print(json.dumps({"summary": True, "samples": count, "seconds": round(time.monotonic() - start, 2),
                      "peak_rss_mb": round(peak, 1),
                      "max_gap_s": round(max_gap, 2), **stream.metrics.as_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
