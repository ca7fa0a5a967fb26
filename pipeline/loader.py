"""The train and eval loaders: shards -> stream -> views -> DALI graph -> torch batches.

A train step of one rank takes ``images_per_step`` images from its `SampleStream`, draws ``repeats``
views of each (`pipeline.views`), lets DALI decode each image once and cut its views, and hands back a
`Batch` of ``images_per_step * repeats`` views, all views of an image in the same step. With repeats > 1
the views of a step are handed out in a seeded random order: Mixup/CutMix pairs view i with view N-1-i
(timm's batch mode), and with an image's views side by side all k of them would meet the k views of one
other image; shuffled, each view meets a partner of its own, as under DeiT's RASampler, which spreads
the copies over ranks.
Its state is the stream position and the step, taken at the last batch handed out (DALI reads ahead,
so the stream itself is further on); restoring it continues with exactly the next samples and views.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.dali_graph import device_id_of, eval_graph, run_graph, to_torch, train_graph
from pipeline.order import per_rank
from pipeline.stream import STATE_VERSION, PieceReader, Sample, SampleStream, ShardSet, StreamMetrics
from pipeline.transfer import to_device
from pipeline.views import batch_rng, draw_views, reflect_outside, replayed_image_views, step_rng

log = logging.getLogger(__name__)


@dataclass
class Batch:
    views: torch.Tensor  # uint8 [n*k, 3, S, S], channels_last memory
    labels: torch.Tensor  # int64 [n*k]
    keys: list[str]  # [n*k], the key of each view's image
    boxes: torch.Tensor  # float32 [n*k, 4]: (y0, x0, y1, x1) of each view, relative to its image
    flips: torch.Tensor  # int32 [n*k]
    step: int
    rng: np.random.Generator  # seeded by (seed, rank, step): for the batch-level augmentation
    rows: np.ndarray  # int64 [n*k]: the manifest row of each view's image (what a teacher cache is keyed by)
    view_ids: np.ndarray | None = None  # int64 [n*k] with augment.replay_views: which of its image's crops


@dataclass(frozen=True)
class _Pending:
    step: int
    position: int  # stream position after this batch
    rows: np.ndarray
    labels: np.ndarray  # int64 [n*k], in the step's view order: from the host, never read back from DALI
    keys: list[str]
    boxes: np.ndarray
    flips: np.ndarray
    order: np.ndarray | None  # the step's view order (repeats > 1): rows, labels, boxes here; views after DALI
    view_ids: np.ndarray | None


def plan_batch(global_views: int, world: int, repeats: int, exact: bool = True, even: bool = False) -> int:
    """Images per rank per step. An image brings all its ``repeats`` views into one step, so a rank's views
    are rounded down to a multiple of ``repeats`` (DeiT's 1024 over 8 GPUs at x3: 128 -> 126 views, i.e.
    42 images; the effective global batch is 1008, which `effective_batch` reports for lr scaling).
    ``even`` (Mixup/CutMix on: it pairs view i with view N-1-i, as timm's Mixup requires an even batch)
    also rounds to an even number of views: DeiT's 1024 on 1 GPU is 341 images, 1023 views -> 340, 1020.
    ``exact=False`` (an elastic run, whose worker count changes) also rounds a global batch that the
    worker count does not divide down, instead of refusing it."""
    if global_views % world:
        if exact:
            raise ValueError(f"data.batch_size={global_views} is not divisible by {world} workers; "
                             f"make it a multiple of the worker count")
        log.info("data.batch_size=%d over %d workers: %d views per worker", global_views, world,
                 global_views // world)
    per_rank = global_views // world
    least = 2 * repeats if even and repeats % 2 else repeats
    if per_rank < least:
        raise ValueError(f"per-worker batch {per_rank} views is smaller than {least} (stream.repeats={repeats}"
                         f"{', an even number of views for Mixup/CutMix' if least > repeats else ''}): "
                         f"raise data.batch_size to at least {world * least}")
    images = per_rank // repeats
    if even and images * repeats % 2:
        images -= 1
    if images * repeats != per_rank:
        log.info("per-worker batch %d views: using %d views (%d images x %d repeats%s) per worker", per_rank,
                 images * repeats, images, repeats, ", an even number for Mixup/CutMix" if even else "")
    return images


def effective_batch(global_views: int, world: int, repeats: int, exact: bool = True, even: bool = False) -> int:
    """Views per optimizer step across all ranks, after `plan_batch`'s rounding."""
    return plan_batch(global_views, world, repeats, exact, even) * repeats * world


def state_for_world(states: dict[str, dict[str, Any]], shards: ShardSet, world: int, rank: int) -> dict[str, Any]:
    """A loader state for ``rank`` of ``world`` workers from the states another worker count saved (an
    elastic run resized): the same step, at the start of the next pass of the new partition. The part of
    the interrupted pass not yet read is skipped (every rank of a pass covers a contiguous range of its
    shard order, so no position of the new partition means "where the old one stopped")."""
    step = max(int(s["step"]) for s in states.values())
    old = next(iter(states.values()))["stream"]
    position = max(int(s["stream"]["position"]) for s in states.values())
    old_per = per_rank(shards.counts, int(old["world"]))
    next_pass = -(-position // old_per)
    return {"version": STATE_VERSION, "step": step,
            "stream": {**old, "world": world, "rank": rank, "position": next_pass * per_rank(shards.counts, world)}}


class TrainLoader:
    """Endless train batches for one rank; ``steps_per_epoch`` tells where the papers' epochs end."""

    def __init__(self, shards: ShardSet, data: DataConfig, world: int = 1, rank: int = 0, device: str = "cpu",
                 threads: int = 4, dali_threads: int = 2, state: dict[str, Any] | None = None,
                 exact_batch: bool = True, decode_crop: bool = True, torch_resize: bool = True):
        self.shards, self.data, self.world, self.rank, self.device = shards, data, world, rank, device
        self.repeats = data.stream.repeats
        if 0 < data.augment.replay_views < self.repeats:
            raise ValueError(f"augment.replay_views={data.augment.replay_views} is fewer than stream.repeats="
                             f"{self.repeats}: an image's views in a step must be distinct crops; replay at least "
                             f"{self.repeats} views per image (a larger `teacher-cache build --views`)")
        self.images_per_step = plan_batch(data.batch_size, world, self.repeats, exact_batch, data.mix.enabled)
        # one epoch = N views = N / k distinct images (DeiT: "100 epochs, each 3x longer" is called 300), in
        # steps of the views actually trained (1008 of 1024 on 8 GPUs at x3), so an epoch is N views, not 98%.
        # An elastic run keeps the nominal batch: its epochs must not change length when the group resizes.
        views_per_step = self.images_per_step * self.repeats * world if exact_batch else data.batch_size
        self.steps_per_epoch = len(shards) // views_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={data.batch_size} is larger than the {len(shards)} samples of "
                             f"{shards.location.url}; lower it")
        self.step = 0
        position = 0
        self.stream = SampleStream(shards, data.stream, world, rank, threads)
        if state is not None:
            self.stream.check_state(state["stream"])
            position, self.step = state["stream"]["position"], state["step"]
        self.stream.position = position
        self._state = {"stream": self.stream.state_dict(), "step": self.step}
        self._samples: Iterator[Sample] | None = None
        self._pending: deque[_Pending] = deque()
        self._next_step = self.step
        self._device_id = device_id_of(device)
        self.pipe = train_graph(self._feed, self.images_per_step, self.repeats, data.augment, self._device_id,
                                num_threads=dali_threads, seed=data.stream.seed + rank, decode_crop=decode_crop,
                                torch_resize=torch_resize)

    @property
    def metrics(self) -> StreamMetrics:
        return self.stream.metrics

    def state_dict(self) -> dict[str, Any]:
        """Loader position at the last batch handed out: put it in the checkpoint with that step."""
        return {"version": STATE_VERSION, **self._state}

    def _feed(self) -> tuple[list, list, list]:
        """DALI's external source: the next step's encoded images and view boxes and flips."""
        if self._samples is None:
            self._samples = iter(self.stream)
        samples = [next(self._samples) for _ in range(self.images_per_step)]
        rng = step_rng(self.data.stream.seed, self.rank, self._next_step)
        widths, heights = np.array([s.width for s in samples]), np.array([s.height for s in samples])
        image_rows = np.array([s.row for s in samples])
        rows = np.repeat(image_rows, self.repeats)
        labels = np.repeat(np.array([s.label for s in samples], dtype=np.int64), self.repeats)
        view_ids = None
        if self.data.augment.replay_views:  # k distinct crops of the image's fixed R
            view_ids = np.argsort(rng.random((len(samples), self.data.augment.replay_views)), axis=1)[:, :self.repeats]
            views = replayed_image_views(self.data.augment.replay_seed, image_rows, view_ids, widths, heights,
                                         self.data.augment)
            view_ids = view_ids.reshape(-1)
        else:
            views = draw_views(rng, widths, heights, self.repeats, self.data.augment)
        keys = [s.key for s in samples for _ in range(self.repeats)]
        boxes, flips = views.boxes.reshape(-1, 4), views.flips.reshape(-1)
        order = rng.permutation(len(rows)) if self.repeats > 1 else None  # drawn after the views
        if order is not None:
            rows, labels, keys = rows[order], labels[order], [keys[i] for i in order]
            boxes, flips = boxes[order], flips[order]
            view_ids = None if view_ids is None else view_ids[order]
        self._pending.append(_Pending(self._next_step, self.stream.position, rows, labels, keys, boxes, flips,
                                      order, view_ids))
        self._next_step += 1
        return [np.frombuffer(s.data, dtype=np.uint8) for s in samples], list(views.boxes), list(views.flips)

    def __iter__(self) -> Iterator[Batch]:
        self.pipe.build()
        while True:
            (views,) = run_graph(self.pipe, self._device_id)
            meta = self._pending.popleft()
            images = to_torch(views, self.device)  # [n, k, S, S, 3]
            n, k, size = images.shape[0], images.shape[1], images.shape[2]
            images = images.reshape(n * k, size, size, 3)
            labels = to_device(meta.labels, images.device)
            if meta.order is not None:
                order = to_device(meta.order, images.device)
                rows_of = images.view(n * k, -1)  # whole views as rows: a row gather is ~3x faster than 4-D
                images = rows_of.index_select(0, order).view(n * k, size, size, 3)
            boxes, flips = torch.from_numpy(meta.boxes), torch.from_numpy(meta.flips)
            if self.data.augment.crop == "simple":
                images = reflect_outside(images, boxes, flips)
            images = images.permute(0, 3, 1, 2)  # NCHW view of NHWC memory
            self.step = meta.step + 1
            self._state = {"stream": {**self.stream.state_dict(), "position": meta.position}, "step": self.step}
            yield Batch(images, labels, meta.keys, boxes, flips, meta.step,
                        batch_rng(self.data.stream.seed, self.rank, meta.step), meta.rows, meta.view_ids)


class EvalLoader:
    """Every val sample exactly once per pass, split over ranks in contiguous, nearly equal slices, read
    shard piece by shard piece (never the whole split in memory); the last batch may be shorter. An
    unreadable shard is skipped and counted (``metrics``); when most shards are, the pass stops with a
    `StreamError` that says what to check."""

    def __init__(self, shards: ShardSet, data: DataConfig, batch_size: int, world: int = 1, rank: int = 0,
                 device: str = "cpu", dali_threads: int = 2, max_failed_fraction: float = 0.5,
                 torch_resize: bool = True):
        self.shards, self.data, self.device, self.batch_size = shards, data, device, batch_size
        self.max_failed_fraction = max_failed_fraction  # of the shards read so far: more -> StreamError
        self.rows = np.array_split(np.arange(len(shards)), world)[rank]
        self.metrics = StreamMetrics()
        self.pieces = PieceReader(shards, data.stream, self.metrics)
        self._batches: Iterator[list[Sample]] = iter(())
        self._current: deque[list[Sample]] = deque()
        self._device_id = device_id_of(device)
        self.pipe = eval_graph(self._feed, batch_size, data.augment, self._device_id, num_threads=dali_threads,
                               torch_resize=torch_resize)
        self._built = False

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def _read(self) -> Iterator[list[Sample]]:
        batch: list[Sample] = []
        for shard in np.unique(self.shards.shards[self.rows]):
            mine = self.rows[self.shards.shards[self.rows] == shard]
            start = int(mine[0] - self.shards.shard_starts[shard])
            found = self.pieces.read(int(shard), start, start + len(mine))
            self.pieces.check_health(self.max_failed_fraction)  # one bad shard is skipped, a dead store is not
            for row in mine:
                if int(row) in found:
                    batch.append(found[int(row)])
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _feed(self):
        samples = next(self._batches)  # StopIteration ends DALI's pass
        self._current.append(samples)
        return [np.frombuffer(s.data, dtype=np.uint8) for s in samples]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """(images uint8 [n,3,S,S], labels [n], keys) per batch, then the pass ends."""
        if self._built:
            self.pipe.reset()
        else:
            self.pipe.build()
            self._built = True
        self._batches = self._read()
        self._current.clear()
        while True:
            try:
                (images,) = run_graph(self.pipe, self._device_id)
            except StopIteration:
                return
            samples = self._current.popleft()
            yield (to_torch(images, self.device).permute(0, 3, 1, 2),
                   to_device(np.array([s.label for s in samples], dtype=np.int64), self.device),
                   [s.key for s in samples])
