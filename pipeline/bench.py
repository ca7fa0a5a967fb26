"""`pipeline bench build`: how close build-shards comes to a plain copy of the same bytes, in one run.

Both sides read the same source files (from the page cache: the tree is read once before timing), use
the same number of processes, and are timed end to end, process start-up included, as a user runs them.
The baseline copies every file to a mirrored tree (what `cp -r` does); the build writes shards, hashes
every sample, parses every header and writes the manifest. Runs alternate, the best of each is reported.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.build import BuildConfig, build_shards
from pipeline.sources import scan
from pipeline.storage import Location
from pipeline.synthetic import write_imagenet_like


def _copy_files(pairs: list[tuple[str, str]]) -> int:
    for source, target in pairs:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
    return len(pairs)


def plain_copy(files: list[str], src_dir: str, dst_dir: str, workers: int) -> None:
    """Copy ``files`` (paths under src_dir) to the same relative paths under dst_dir, in worker processes."""
    pairs = [(f, os.path.join(dst_dir, os.path.relpath(f, src_dir))) for f in files]
    chunks = [pairs[i::workers] for i in range(workers)]
    if workers == 1:
        _copy_files(pairs)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_copy_files, chunks))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_build(src: str | None = None, images: int = 2000, split: str = "train", workers: int = 2,
                shard_bytes: int = 256 * 1024 * 1024, repeat: int = 3) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        generated = src is None
        if generated:
            write_imagenet_like(Path(tmp) / "src", images, split=split)
            src = str(Path(tmp) / "src")
        listing = scan(src, split)
        files = [os.path.join(listing.split_dir, s.relpath) for s in listing.samples]
        total = sum(s.size for s in listing.samples)
        for f in files:  # warm the page cache so neither side pays for the first read
            with open(f, "rb") as handle:
                handle.read()
        copy_s, build_s = [], []
        for r in range(repeat):
            out_copy, out_build = Path(tmp) / f"copy{r}", Path(tmp) / f"build{r}"
            copy_s.append(_timed(lambda o=out_copy: plain_copy(files, str(listing.split_dir), str(o), workers)))
            build_s.append(_timed(lambda o=out_build: build_shards(BuildConfig(
                src=src, dst=Location(str(o)), split=split, shard_bytes=shard_bytes, workers=workers,
                max_bad=1.0))))
            shutil.rmtree(out_copy)
            shutil.rmtree(out_build)
    n, mb = len(files), total / 1e6
    best_copy, best_build = min(copy_s), min(build_s)
    origin = "generated ImageNet-like JPEGs" if generated else src
    lines = [
        f"pipeline bench build: {n} images, {mb:.1f} MB ({mb * 1e3 / max(n, 1):.0f} KB/image, {origin}), "
        f"{workers} workers, best of {repeat}, page cache warm",
        f"{'method':<28}{'seconds':>9}{'images/s':>11}{'MB/s':>9}{'vs copy':>9}",
        f"{'plain copy (cp -r)':<28}{best_copy:>9.2f}{n / best_copy:>11.0f}{mb / best_copy:>9.1f}{1.0:>9.2f}",
        f"{'build-shards':<28}{best_build:>9.2f}{n / best_build:>11.0f}{mb / best_build:>9.1f}"
        f"{_ratio(best_copy / best_build):>9}",
    ]
    return "\n".join(lines)


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits for a ratio under 0.1 (a tiny tree's fixed costs)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"
