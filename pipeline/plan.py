"""The shard plan: which sample goes into which shard, decided before any byte is read.

Pure and seeded: the same listing, seed and size give the same plan on every run, which is what makes a
killed build resumable (complete shards are kept, the rest are redone with the same contents). Samples
are shuffled globally, so every shard is a class-mixed sample of the whole set and a streaming reader
with a modest shuffle buffer sees well-mixed batches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from pipeline.sources import SourceSample

TAR_OVERHEAD = 2048  # two 512-byte headers per sample (.jpg, .cls) plus padding, on average


@dataclass(frozen=True)
class PlannedSample:
    key: str  # unique within the split; digits only, so every tar reader splits it from the extension
    relpath: str
    label: int


@dataclass(frozen=True)
class ShardPlan:
    split: str
    shards: tuple[tuple[PlannedSample, ...], ...]
    digest: str  # identifies the inputs of the plan; a resumed build must see the same one

    def shard_name(self, index: int) -> str:
        return shard_name(self.split, index)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_glob(split: str) -> str:
    """The glob pattern that matches every `shard_name` of ``split``."""
    return f"{split}-*.tar"


def shuffled_order(count: int, seed: int) -> np.ndarray:
    """A permutation of range(count), the same for the same (count, seed) on every machine."""
    return np.random.Generator(np.random.PCG64(seed)).permutation(count)


def cut_by_size(sizes: list[int], shard_bytes: int, max_samples: int | None = None) -> list[int]:
    """Start offsets of consecutive shards: a new shard begins when the current one would pass the size."""
    starts = [0] if sizes else []
    current = 0
    count = 0
    for i, size in enumerate(sizes):
        cost = size + TAR_OVERHEAD
        full = current + cost > shard_bytes or (max_samples is not None and count >= max_samples)
        if count and full:
            starts.append(i)
            current, count = 0, 0
        current += cost
        count += 1
    return starts


def make_plan(split: str, samples: list[SourceSample], seed: int, shard_bytes: int,
              max_samples: int | None = None, extra: dict | None = None) -> ShardPlan:
    """Shuffle ``samples`` (keys are their positions in the sorted listing) and cut them into shards."""
    if shard_bytes <= 0:
        raise ValueError("--shard-size must be positive, e.g. 256MB")
    order = shuffled_order(len(samples), seed)
    width = max(8, len(str(len(samples))))
    ordered = [PlannedSample(f"{i:0{width}d}", samples[i].relpath, samples[i].label) for i in order]
    starts = cut_by_size([samples[i].size for i in order], shard_bytes, max_samples)
    ends = starts[1:] + [len(ordered)]
    shards = tuple(tuple(ordered[a:b]) for a, b in zip(starts, ends, strict=True))
    digest = _digest(split, samples, seed, shard_bytes, max_samples, extra or {})
    return ShardPlan(split, shards, digest)


def _digest(split: str, samples: list[SourceSample], seed: int, shard_bytes: int,
            max_samples: int | None, extra: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([split, seed, shard_bytes, max_samples, extra], sort_keys=True).encode())
    for s in samples:
        h.update(f"\n{s.relpath}\t{s.label}\t{s.size}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
