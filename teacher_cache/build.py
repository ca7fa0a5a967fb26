"""`teacher-cache build`: run the teacher once over every image and store its logit maps (or, with
``views=R``, its outputs on R fixed training crops per image: a replay cache).

A Ray job: a pool of actors (one per GPU, or CPU workers when there is none) each takes whole shards,
reads them with the stream's piece reader, decodes and resizes every image to R x R with DALI (the same
decoder as training), runs the teacher's logit map in bf16 / channels_last on a GPU without gradients,
encodes top-k per location and writes one parquet file per shard, atomically. Finished shards are kept
on a re-run (resumable per shard); ``cache.json``, written last, records dataset and teacher identity.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from infra.raycluster import connect_ray
from pipeline.batch_aug import normalize
from pipeline.config import AugmentConfig, StreamConfig
from pipeline.dali_graph import device_id_of, run_graph, to_torch, train_graph, whole_image_graph
from pipeline.progress import Progress
from pipeline.storage import Location
from pipeline.stream import PieceReader, Sample, ShardSet, StreamMetrics
from pipeline.views import reflect_outside, replayed_image_views
from teacher_cache.cache import (
    CacheMismatch,
    check_identity,
    check_replay,
    read_info,
    read_part_meta,
    replay_identity,
    write_info,
    write_part,
)
from teacher_cache.maps import EncodedMaps, copy_to_host, encode_on_device
from teacher_cache.teacher import Teacher, TeacherSpec, expected_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheBuildConfig:
    shards: Location
    out: Location
    teacher: TeacherSpec
    split: str = "train"
    topk: int = 10
    batch_size: int = 64
    workers: int | None = None  # actors; default: one per GPU, else 1; 0: in this process, without Ray
    cpus_per_worker: int = 1
    dali_threads: int = 2
    overwrite: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # mean/std; with views, the crops' settings
    views: int = 0  # > 0: a replay cache, the teacher's outputs on this many fixed crops per image; 0: maps
    seed: int = 0  # with views: which crops (training runs replay them with augment.replay_seed)
    compile: str | None = None  # torch.compile the teacher with this backend ("inductor"); None: eager

    def __post_init__(self) -> None:
        if self.views and self.teacher.resolution != self.augment.image_size:
            raise ValueError(f"a replay cache runs the teacher on the training crops ({self.augment.image_size} px): "
                             f"teacher resolution {self.teacher.resolution} must be the same")

    @property
    def images_per_batch(self) -> int:
        """Images per DALI batch: ``batch_size`` is the teacher's batch, in whole images or in views."""
        return max(1, self.batch_size // self.views) if self.views else self.batch_size


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ShardGraph:
    """One DALI graph fed shard after shard: decode -> the whole image at the teacher's resolution (a map
    cache), or decode -> the image's R fixed crops (a replay cache, the training loader's own graph).
    Building a graph costs about 0.2 s on a CPU, and more with nvJPEG's decoder on a GPU, against an
    ImageNet build's hundreds of shards. Each shard is one pass of the graph (its source ends with the
    shard, and the graph is reset for the next)."""

    @classmethod
    def for_teacher(cls, teacher: Teacher, cfg: CacheBuildConfig) -> ShardGraph:
        """The graph a build worker feeds ``teacher`` with: on its device, whole images or crops."""
        device_id = device_id_of(teacher.device)
        if cfg.views:
            return cls(lambda source: train_graph(source, cfg.images_per_batch, cfg.views, cfg.augment, device_id,
                                                  num_threads=cfg.dali_threads), device_id)
        return cls(lambda source: whole_image_graph(source, cfg.batch_size, teacher.spec.resolution, device_id,
                                                    cfg.dali_threads), device_id)

    def __init__(self, graph: Callable[[Callable[[], Any]], Any], device_id: int | None) -> None:
        self._graph = graph  # source -> an unbuilt DALI pipeline
        self._device_id = device_id  # the graph's GPU (its outputs come on torch's stream there), None: CPU
        self._feed: deque[Any] = deque()
        self._pipe: Any = None
        self._ended = False  # the last pass ran to its end (its source said so): reset() starts the next
        self.builds = 0  # graphs built (one, unless a pass was cut short)

    def _next(self) -> Any:
        if not self._feed:
            raise StopIteration
        return self._feed.popleft()

    def __call__(self, feeds: list[Any]) -> Iterator[Any]:
        """The graph's first output for each feed (what its source returns for one batch), in order."""
        if not feeds:
            return
        if self._pipe is not None and self._ended and self._pipe.empty():
            self._pipe.reset()  # the source said StopIteration in the last run() (DALI calls it in run())
        else:  # the first pass, or one cut short by an error (a reset would replay its prefetched batches)
            self._pipe = self._graph(self._next)
            self._pipe.build()
            self.builds += 1
        self._ended = False
        self._feed.clear()
        self._feed.extend(feeds)
        for i in range(len(feeds)):
            out = run_graph(self._pipe, self._device_id)[0]
            self._ended = i == len(feeds) - 1
            yield out


def _feed(samples: list[Sample], cfg: CacheBuildConfig) -> Any:
    """What the graph's source returns for one batch of images: their bytes, and for a replay cache each
    image's R crops (`pipeline.views.replayed_image_views`) as the training loader feeds them."""
    encoded = [np.frombuffer(s.data, dtype=np.uint8) for s in samples]
    if not cfg.views:
        return encoded
    n = len(samples)
    views = replayed_image_views(cfg.seed, np.array([s.row for s in samples]), np.tile(np.arange(cfg.views), (n, 1)),
                                 np.array([s.width for s in samples]), np.array([s.height for s in samples]),
                                 cfg.augment)
    return encoded, list(views.boxes), list(views.flips)


def _teacher_input(out: Any, feed: Any, teacher: Teacher, cfg: CacheBuildConfig) -> torch.Tensor:
    """The graph's output for one batch -> the teacher's normalised input [B, 3, S, S]: whole images, or
    every image's R crops in order (image 0's views 0..R-1, then image 1's, ...)."""
    images = to_torch(out, str(teacher.device))
    if cfg.views:  # [n, R, S, S, 3] -> [n R, S, S, 3], as the loader hands views on
        n, views, size = images.shape[0], images.shape[1], images.shape[2]
        images = images.reshape(n * views, size, size, 3)
        if cfg.augment.crop == "simple":
            boxes, flips = np.concatenate(feed[1]), np.concatenate(feed[2])
            images = reflect_outside(images, torch.from_numpy(boxes), torch.from_numpy(flips))
    return normalize(images.permute(0, 3, 1, 2), cfg.augment)


def _encode(x: torch.Tensor, teacher: Teacher, images: int, cfg: CacheBuildConfig) -> tuple:
    """Teacher outputs for one batch, encoded on its device: a logit map per image, or per image the R
    views' logits as R cells of a 1 x 1 map (the same top-k + floor encoding, one cell per view)."""
    if not cfg.views:
        return encode_on_device(teacher.logit_map(x), cfg.topk)
    logits = teacher.logits(x).view(images, cfg.views, -1).permute(0, 2, 1).unsqueeze(-1)  # [n, C, R, 1]
    return (*encode_on_device(logits, cfg.topk)[:3], 1, 1)


def encode_shard(shards: ShardSet, shard: int, teacher: Teacher, cfg: CacheBuildConfig,
                 decode: ShardGraph | None = None) -> tuple[list[str], EncodedMaps, int]:
    """All images of one shard -> (keys in manifest order, encoded maps, unreadable count); ``decode``:
    the caller's graph, kept from shard to shard (default: one for this shard)."""
    count = int(shards.counts[shard])
    first = int(shards.shard_starts[shard])
    metrics = StreamMetrics()
    found = PieceReader(shards, StreamConfig(), metrics).read(shard, 0, count)
    rows = list(range(first, first + count))
    readable = [r for r in rows if r in found]
    step = cfg.images_per_batch
    chunks = [readable[i:i + step] for i in range(0, len(readable), step)]
    if decode is None:
        decode = ShardGraph.for_teacher(teacher, cfg)
    feeds = [_feed([found[r] for r in chunk], cfg) for chunk in chunks]
    pieces: dict[int, EncodedMaps] = {}

    def keep(chunk: list[int], copied: Callable[[], EncodedMaps]) -> None:
        maps = copied()  # waits for this batch's teacher and copy only
        for i, row in enumerate(chunk):
            pieces[row] = EncodedMaps(maps.indices[i:i + 1], maps.values[i:i + 1], maps.floor[i:i + 1],
                                      maps.height, maps.width)

    pending = None
    for chunk, feed, out in zip(chunks, feeds, decode(feeds), strict=True):
        queued = (chunk, copy_to_host(_encode(_teacher_input(out, feed, teacher, cfg), teacher, len(chunk), cfg)))
        if pending is not None:  # on a GPU this batch's teacher runs while the last one's maps come back
            keep(*pending)
        pending = queued
    if pending is not None:
        keep(*pending)
    if not pieces:
        raise RuntimeError(f"shard {shards.shard_names.get(shard)} has no readable image")
    any_map = next(iter(pieces.values()))
    blank = EncodedMaps(np.zeros_like(any_map.indices), np.zeros_like(any_map.values), np.zeros_like(any_map.floor),
                        any_map.height, any_map.width)  # unreadable images: the stream never serves them
    ordered = [pieces.get(r, blank) for r in rows]
    stacked = EncodedMaps(np.concatenate([m.indices for m in ordered]), np.concatenate([m.values for m in ordered]),
                          np.concatenate([m.floor for m in ordered]), any_map.height, any_map.width)
    return [str(shards.keys[r]) for r in rows], stacked, count - len(readable)


class CacheWorker:
    """One actor: a teacher on one device, encoding whole shards on request."""

    def __init__(self, cfg: CacheBuildConfig, device: str):
        logging.basicConfig(level=logging.INFO)
        self.cfg = cfg
        self.shards = ShardSet.open(cfg.shards, cfg.split)
        self.teacher = Teacher(cfg.teacher, device, compile=cfg.compile)
        self.decode = ShardGraph.for_teacher(self.teacher, cfg)

    def identity(self) -> dict[str, Any]:
        return self.teacher.identity

    def run(self, shard: int, meta: dict[str, Any]) -> dict[str, Any]:
        keys, maps, unreadable = encode_shard(self.shards, shard, self.teacher, self.cfg, self.decode)
        result = {**meta, "shard": shard, "samples": len(keys), "unreadable": unreadable, "height": maps.height,
                  "width": maps.width, "bytes_per_image": maps.bytes_per_image,
                  "device": self.teacher.device.type,  # decoder and teacher: a CPU build's pixels differ a little
                  "compile": self.cfg.compile or "eager"}  # a compiled teacher rounds a little differently
        result["bytes"] = write_part(self.cfg.out, self.cfg.split, shard, keys, maps, result)
        return result


def build_cache(cfg: CacheBuildConfig) -> dict[str, Any]:
    cfg.teacher.check()
    shards = ShardSet.open(cfg.shards, cfg.split)
    previous = read_info(cfg.out)
    if previous is not None and not cfg.overwrite:
        try:  # a finished cache of this data *and this teacher* is the answer; anything else is refused
            check_identity(cfg.out.url, previous, shards.fingerprint, expected_identity(cfg.teacher))
            if previous["map"]["k"] != cfg.topk:
                raise CacheMismatch(f"teacher cache {cfg.out.url} keeps top-{previous['map']['k']} logits, this "
                                    f"build asks for top-{cfg.topk}")
            check_replay(cfg.out.url, previous.get("views"), cfg.augment, cfg.views, cfg.seed)
        except CacheMismatch as exc:
            raise CacheMismatch(f"{exc} (or pass --overwrite)") from None
        log.info("teacher cache %s is complete; nothing to do", cfg.out.url)
        return previous
    meta = {"fingerprint": shards.fingerprint, "teacher": cfg.teacher.name, "resolution": cfg.teacher.resolution,
            "weights": cfg.teacher.weights, "k": cfg.topk, "views": replay_identity(cfg.augment, cfg.views, cfg.seed)}
    results: dict[int, dict[str, Any]] = {}
    for shard in sorted(shards.shard_names):  # parts are atomic: one that matches this build is finished
        found = read_part_meta(cfg.out, cfg.split, shard)
        if found is not None and all(found.get(k) == v for k, v in meta.items()):
            results[shard] = found
    pending = [s for s in sorted(shards.shard_names) if s not in results]
    total = int(sum(shards.counts[s] for s in pending))
    if cfg.workers == 0:  # one teacher here (a single-GPU machine, a benchmark): the same parts, no Ray
        worker = CacheWorker(cfg, _device())
        identity = worker.identity()
        log.info("teacher cache: %d shards to encode (%d kept) in this process on %s -> %s", len(pending),
                 len(results), worker.teacher.device, cfg.out.url)
        with Progress(total, "teacher-cache build") as progress:
            for shard in pending:
                results[shard] = worker.run(shard, meta)
                progress.update(results[shard]["samples"])
        return _finish(cfg, shards, identity, results)
    ray = connect_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = max(1, min(cfg.workers or gpus or 1, len(pending) or 1))
    options = {"num_gpus": 1} if gpus else {"num_cpus": cfg.cpus_per_worker}
    actor_cls = ray.remote(**options)(CacheWorker)
    actors = [actor_cls.remote(cfg, "cuda" if gpus else "cpu") for _ in range(workers)]
    identity = ray.get(actors[0].identity.remote())
    log.info("teacher cache: %d shards to encode (%d kept) with %d %s worker(s) -> %s", len(pending), len(results),
             workers, "GPU" if gpus else "CPU", cfg.out.url)
    from ray.util import ActorPool

    with Progress(total, "teacher-cache build") as progress:
        for result in ActorPool(actors).map_unordered(lambda a, s: a.run.remote(s, meta), pending):
            results[result["shard"]] = result
            progress.update(result["samples"])
    return _finish(cfg, shards, identity, results)


def _finish(cfg: CacheBuildConfig, shards: ShardSet, identity: dict[str, Any],
            results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Write ``cache.json`` (the commit point) from every shard's part result."""
    first = next(iter(results.values()))
    info = {
        "dataset": {"url": cfg.shards.url, "split": cfg.split, "fingerprint": shards.fingerprint},
        "teacher": identity, "map": {"height": first["height"], "width": first["width"], "k": cfg.topk},
        "views": replay_identity(cfg.augment, cfg.views, cfg.seed),
        "shards": sorted(results), "num_samples": int(sum(r["samples"] for r in results.values())),
        "unreadable": int(sum(r["unreadable"] for r in results.values())),
        "bytes_per_image": first["bytes_per_image"], "bytes": int(sum(r["bytes"] for r in results.values())),
        "build": {"topk": cfg.topk, "batch_size": cfg.batch_size, "split": cfg.split,
                  "devices": sorted({r.get("device", "unknown") for r in results.values()}),
                  "compile": sorted({r.get("compile", "eager") for r in results.values()})},
    }
    write_info(cfg.out, info)
    return info
