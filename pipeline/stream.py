"""Shards on any fsspec URL -> a per-rank stream of encoded samples, in the order of `pipeline.order`.

Each window of the order is fetched by a pool of threads as one ranged read per shard piece (sequential
bytes of a tar, requested in chunks of ``read_chunk_bytes``: a failed request is retried with backoff from
the chunk where it broke), optionally through a local shard cache. Samples are sliced out of those bytes
at the manifest's offsets, after checking the tar header names the expected member.

Nothing here decides order, so the number of threads never changes what comes out. A sample that cannot
be used (corrupt bytes, unreadable shard after retries) is skipped and counted, and its place is taken
by another sample of the same window (or of the last good window), so that every rank still yields
exactly its planned count and DDP never waits on a rank that ran short. When most shards read so far are
unreadable (the store is down, wrong endpoint or credentials), the stream stops with a `StreamError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import StreamConfig
from pipeline.images import has_end_marker
from pipeline.manifest import DatasetError, check_manifest, read_info, read_manifest
from pipeline.order import Window, locate, per_rank, rank_windows, window_samples
from pipeline.storage import Location

log = logging.getLogger(__name__)

STATE_VERSION = 1
_BLOCK = tarfile.BLOCKSIZE
_BORROW_WINDOWS = 4  # windows read ahead for donors when a rank's first window is unreadable


class StreamError(RuntimeError):
    """The stream cannot go on (most shards unreadable, wrong dataset); the message says which and why."""


@dataclass
class ShardSet:
    """A built split as the stream needs it: manifest columns as arrays, shard names, fingerprint."""

    location: Location
    split: str
    fingerprint: str
    shard_names: dict[int, str]
    keys: np.ndarray
    labels: np.ndarray
    shards: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    counts: np.ndarray  # samples per shard index, shard indices 0..max
    shard_starts: np.ndarray  # first manifest row of each shard index

    @classmethod
    def open(cls, location: Location, split: str, expect_fingerprint: str | None = None) -> ShardSet:
        info = read_info(location, split)
        if expect_fingerprint is not None and expect_fingerprint != info.fingerprint:
            raise DatasetError(
                f"{location.url} split {split!r} has fingerprint {info.fingerprint[:16]}, but this run "
                f"expects {expect_fingerprint[:16]}: the shards were rebuilt or another dataset was given; "
                f"point the run at the shards it started with, or start a new run"
            )
        table = read_manifest(location, split)
        if table.num_rows != info.num_samples:
            raise DatasetError(f"{location.url}/{split}.parquet has {table.num_rows} rows, the dataset info "
                               f"says {info.num_samples}: run `pipeline inspect` and rebuild")
        check_manifest(table, location, info)  # labels within classes.json, rows inside listed shards
        col = {name: table.column(name).to_numpy() for name in
               ("label", "shard", "offset", "size", "width", "height")}
        shards = col["shard"].astype(np.int64)
        if len(shards) and (np.diff(shards) < 0).any():
            raise DatasetError(f"{location.url}/{split}.parquet is not in shard order; rebuild the split")
        num = int(shards.max()) + 1 if len(shards) else 0
        counts = np.bincount(shards, minlength=num)
        return cls(location, split, info.fingerprint, {s["index"]: s["name"] for s in info.shards},
                   np.asarray(table.column("key").to_pylist(), dtype=object), col["label"].astype(np.int64),
                   shards, col["offset"].astype(np.int64), col["size"].astype(np.int64),
                   col["width"].astype(np.int64), col["height"].astype(np.int64), counts,
                   np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Sample:
    row: int  # manifest row
    key: str
    label: int
    width: int
    height: int
    data: bytes  # the encoded JPEG


@dataclass
class StreamMetrics:
    samples: int = 0  # yielded to the consumer
    fetched: int = 0  # read from storage (read-ahead included)
    bytes_read: int = 0
    read_retries: int = 0
    corrupt_samples: int = 0
    unreadable_pieces: int = 0
    substituted: int = 0
    windows: int = 0
    failed_windows: int = 0
    reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


class ShardReader:
    """Byte ranges of shards, read in chunks of ``read_chunk_bytes`` with retries and backoff, optionally
    kept whole in a local cache folder.

    A failed request (throttling, 5xx, a connection dropped mid-body) is retried from the first byte not
    yet received: chunks already in hand are never fetched again, so a flaky link costs at most one
    chunk per failure. Each chunk has its own ``max_read_retries``, so a long read that keeps making
    progress is not given up on; a chunk that fails that many times makes the whole read fail.
    """

    def __init__(self, shards: ShardSet, cfg: StreamConfig, metrics: StreamMetrics):
        self.shards, self.cfg, self.metrics = shards, cfg, metrics
        self.fs, self.root = shards.location.fs_and_path()
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()
        self._count = threading.Lock()  # metrics are updated from every reader thread

    def read(self, shard: int, start: int, stop: int) -> bytes:
        name = self.shards.shard_names[shard]
        if self.cfg.shard_cache_dir:
            path = self._cached(shard, name)
            with open(path, "rb") as handle:
                handle.seek(start)
                return handle.read(stop - start)
        return b"".join(self.chunks(f"{self.root}/{name}", start, stop))

    def chunks(self, path: str, start: int, stop: int) -> Iterator[bytes]:
        """The bytes ``[start, stop)`` of ``path``, one retried request per chunk."""
        position = start
        while position < stop:
            end = min(position + self.cfg.read_chunk_bytes, stop)
            data = self._retry(f"{path} bytes {position}-{end}", self._get, path, position, end)
            with self._count:
                self.metrics.bytes_read += len(data)
            position += len(data)  # a short answer is not an error: the next request starts where it ended
            yield data

    def _get(self, path: str, start: int, end: int) -> bytes:
        data = self.fs.cat_file(path, start=start, end=end)
        if not data:
            raise EOFError(f"{path} ends before byte {start}, but the manifest needs bytes up to {end}")
        return data

    def _retry(self, what: str, fn, *args):
        delay = 0.05
        for attempt in range(self.cfg.max_read_retries + 1):
            try:
                return fn(*args)
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - object stores raise many kinds of transient errors
                if attempt == self.cfg.max_read_retries:
                    raise
                with self._count:
                    self.metrics.read_retries += 1
                pause = delay * random.uniform(0.5, 1.0)  # jitter: ranks throttled together retry apart
                log.warning("reading %s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__, exc,
                            attempt + 1, self.cfg.max_read_retries, pause)
                time.sleep(pause)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _cached(self, shard: int, name: str) -> str:
        cache = os.path.join(self.cfg.shard_cache_dir, self.shards.fingerprint[:16], self.shards.split)
        path = os.path.join(cache, name)
        with self._guard:
            lock = self._locks.setdefault(shard, threading.Lock())
        with lock:
            if not os.path.exists(path):
                os.makedirs(cache, exist_ok=True)
                tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
                try:
                    with open(tmp, "wb") as handle:
                        remote = f"{self.root}/{name}"
                        size = self._retry(f"the size of {remote}", self.fs.size, remote)
                        for data in self.chunks(remote, 0, size):
                            handle.write(data)
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        return path


class PieceReader:
    """Samples of a run of consecutive rows of one shard: one ranged read, then slices checked against
    the manifest (tar header names the key, JPEG markers, optionally the content hash). A sample that
    fails is skipped, logged and counted; an unreadable piece (after the reader's retries) likewise."""

    def __init__(self, shards: ShardSet, cfg: StreamConfig, metrics: StreamMetrics, verify_hashes: bool = False):
        self.shards, self.cfg, self.metrics, self.verify_hashes = shards, cfg, metrics, verify_hashes
        self.reader = ShardReader(shards, cfg, metrics)
        self._hashes: list[str] | None = None
        self._failing: dict[int, bool] = {}  # shard -> whether its latest read failed after retries
        self._health_lock = threading.Lock()

    def shard_health(self) -> tuple[int, int]:
        """(shards whose latest read failed, shards read so far): a shard that reads again recovers."""
        with self._health_lock:
            return sum(self._failing.values()), len(self._failing)

    def check_health(self, max_failed_fraction: float) -> None:
        """Abort when most shards read so far fail: one bad shard is skipped, a store that is down is not."""
        failing, tried = self.shard_health()
        if failing and failing > max_failed_fraction * max(tried, min(4, len(self.shards.counts))):
            url = self.shards.location.url
            raise StreamError(
                f"{failing} of the {tried} shards of {url} read so far are unreadable after "
                f"{self.cfg.max_read_retries} retries per request ({dict(self.metrics.reasons)}): check that the "
                f"object store answers at the configured endpoint, that the credentials may read the bucket "
                f"and that the shards are there (`pipeline inspect {url}`)")

    def read(self, shard: int, start: int, stop: int) -> dict[int, Sample]:
        s = self.shards
        first = s.shard_starts[shard] + start
        last = s.shard_starts[shard] + stop - 1
        lo = int(s.offsets[first]) - _BLOCK  # the .jpg member's header
        hi = int(s.offsets[last] + -(-s.sizes[last] // _BLOCK) * _BLOCK)
        name = s.shard_names.get(shard, f"shard {shard}")
        try:
            blob = self.reader.read(shard, lo, hi)
        except Exception as exc:  # noqa: BLE001 - skipped and counted; the run goes on
            with self._health_lock:
                self._failing[shard] = True
            self.metrics.unreadable_pieces += 1
            self.metrics.reasons[f"unreadable shard: {type(exc).__name__}"] += stop - start
            log.error("skipping %d samples of %s: unreadable after %d retries (%s: %s)", stop - start, name,
                      self.cfg.max_read_retries, type(exc).__name__, exc)
            return {}
        with self._health_lock:
            self._failing[shard] = False
        out = {}
        for row in range(first, last + 1):
            sample = self._slice(blob, lo, row, name)
            if sample is not None:
                out[row] = sample
        return out

    def _slice(self, blob: bytes, base: int, row: int, shard_name: str) -> Sample | None:
        s = self.shards
        key = s.keys[row]
        begin = int(s.offsets[row]) - base
        data = blob[begin:begin + int(s.sizes[row])]
        header_name = blob[begin - _BLOCK:begin - _BLOCK + 100].split(b"\0", 1)[0]
        reason = None
        if header_name != f"{key}.jpg".encode():
            reason = "tar member does not match the manifest"
        elif len(data) != s.sizes[row] or data[:2] != b"\xff\xd8" or not has_end_marker(data):
            reason = "corrupt JPEG"
        elif self.verify_hashes and hashlib.sha256(data).hexdigest() != self._hash(row):
            reason = "content hash differs from the manifest"
        if reason:
            self.metrics.corrupt_samples += 1
            self.metrics.reasons[reason] += 1
            log.warning("skipping sample %s of %s: %s", key, shard_name, reason)
            return None
        return Sample(row, key, int(s.labels[row]), int(s.widths[row]), int(s.heights[row]), data)

    def _hash(self, row: int) -> str:
        if self._hashes is None:
            table = read_manifest(self.shards.location, self.shards.split)
            self._hashes = table.column("sha256").to_pylist()
        return self._hashes[row]


class SampleStream:
    """One rank's endless stream of samples, starting at ``position`` (images consumed so far)."""

    def __init__(self, shards: ShardSet, cfg: StreamConfig, world: int = 1, rank: int = 0,
                 threads: int = 4, position: int = 0, verify_hashes: bool = False,
                 max_failed_fraction: float = 0.5):
        if len(shards) < world:
            raise StreamError(f"{len(shards)} samples cannot feed {world} ranks")
        self.shards, self.cfg, self.world, self.rank = shards, cfg, world, rank
        self.threads, self.position = max(1, threads), position
        self.max_failed_fraction = max_failed_fraction
        self.per_rank = per_rank(shards.counts, world)
        self.metrics = StreamMetrics()
        self.pieces = PieceReader(shards, cfg, self.metrics, verify_hashes)
        self._last_good: list[Sample] = []

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "position": self.position,
                "world": self.world, "rank": self.rank, "window": self.cfg.shuffle_buffer,
                "fingerprint": self.shards.fingerprint}

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a saved position that belongs to another dataset, seed, world size or window."""
        if state.get("version") != STATE_VERSION:
            raise StreamError(f"loader state version {state.get('version')} is not understood "
                              f"(this code reads {STATE_VERSION})")
        mine = self.state_dict()
        for name in ("fingerprint", "seed", "world", "rank", "window"):
            if state.get(name) != mine[name]:
                raise StreamError(f"loader state has {name}={state.get(name)!r} but this loader has "
                                  f"{mine[name]!r}; resume with the same dataset, seed, world size and "
                                  f"shuffle buffer, or start a new run")

    def __iter__(self) -> Iterator[Sample]:
        pass_index, j, offset = locate(self.position, self.per_rank, self.cfg.shuffle_buffer)
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-reader")
        try:
            pending: deque[Future] = deque()
            upcoming = self._windows(pass_index, j)
            for _ in range(self.threads + 1):  # read ahead: one window per thread, plus the one in use
                pending.append(pool.submit(self._fetch, next(upcoming)))
            while True:
                _, samples = pending.popleft().result()
                pending.append(pool.submit(self._fetch, next(upcoming)))
                for sample in samples[offset:]:
                    self.position += 1
                    self.metrics.samples += 1
                    yield sample
                offset = 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def take(self, count: int) -> list[Sample]:
        """The next ``count`` samples (a fresh iteration starting at the current position)."""
        out = []
        for sample in self:
            out.append(sample)
            if len(out) == count:
                break
        return out

    def _windows(self, pass_index: int, j: int) -> Iterator[Window]:
        while True:
            windows = rank_windows(self.shards.counts, self.cfg.seed, pass_index, self.world, self.rank,
                                   self.cfg.shuffle_buffer)
            yield from windows[j:]
            pass_index, j = pass_index + 1, 0

    def _fetch(self, window: Window) -> tuple[Window, list[Sample]]:
        rows = window_samples(window, self.shards.shard_starts)
        found = self._read(window)
        samples = [found.get(int(r)) for r in rows]
        self.metrics.windows += 1
        self.metrics.fetched += len(rows)
        return window, self._fill(samples, window)

    def _read(self, window: Window) -> dict[int, Sample]:
        found: dict[int, Sample] = {}
        for piece in window.pieces:
            found.update(self.pieces.read(piece.shard, piece.start, piece.stop))
        self._check_shards()
        return found

    def _check_shards(self) -> None:
        self.pieces.check_health(self.max_failed_fraction)

    def _fill(self, samples: list[Sample | None], window: Window) -> list[Sample]:
        """Replace missing samples so the window keeps its length (equal steps on every rank)."""
        good = [x for x in samples if x is not None]
        missing = len(samples) - len(good)
        if missing == 0:
            self._last_good = good
            return good
        self.metrics.substituted += missing
        if not good:
            self.metrics.failed_windows += 1
            if self.metrics.failed_windows > self.max_failed_fraction * max(self.metrics.windows, 4):
                url = self.shards.location.url
                raise StreamError(
                    f"{self.metrics.failed_windows} of {self.metrics.windows} windows of {url} had no usable "
                    f"sample: the store is down or the shards are missing or corrupt; check them with "
                    f"`pipeline inspect {url}` ({dict(self.metrics.reasons)})")
            donors = self._last_good or self._borrow(window)
        else:
            donors = good
            self._last_good = good
        filled, k = [], 0
        for x in samples:
            if x is None:
                x, k = donors[k % len(donors)], k + 1
            filled.append(x)
        return filled

    def _borrow(self, window: Window) -> list[Sample]:
        """Donors for a wholly unreadable window that has no earlier good one (the first window of a rank):
        the good samples of the next windows of this rank's stream."""
        upcoming = self._windows(window.pass_index, window.index + 1)
        for _ in range(_BORROW_WINDOWS):
            found = self._read(next(upcoming))
            if found:
                return list(found.values())
        url = self.shards.location.url
        raise StreamError(f"rank {self.rank}: the first {_BORROW_WINDOWS + 1} windows of {url} have no usable "
                          f"sample ({dict(self.metrics.reasons)}); check the store and the shards with "
                          f"`pipeline inspect {url}`")
