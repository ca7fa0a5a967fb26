"""`pipeline bench stream`: views/s of this loader (repeats 1 and 3) against the peers' loader, in one run.

All three read the same shards and produce the same thing, a batch of DeiT-augmented views ready for the
step (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup/CutMix, normalised):

* ``dali``: this project's stream -> DALI (nvJPEG on a GPU, CPU operators otherwise) -> batch augmentation;
  on a CPU, DALI runs ``workers`` threads and the batch stage the main thread (one torch thread: more
  intra-op threads only fight DALI's for the same cores);
* ``dali x3``: the same with repeated augmentation, each image decoded once for 3 views;
* ``timm+PIL``: the peers' stack: webdataset over the same shards, timm's ``create_transform`` with PIL in
  a torch DataLoader with the same number of worker processes, timm's Mixup on the batch.

Bytes per view are the shard bytes read divided by the views produced.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.batch_aug import BatchAugment
from pipeline.build import BuildConfig, build_shards
from pipeline.config import AugmentConfig, DataConfig, StreamConfig
from pipeline.loader import TrainLoader
from pipeline.storage import Location
from pipeline.stream import ShardSet
from pipeline.synthetic import write_imagenet_like


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


WARMUP_BATCHES = 3  # untimed, before each loader's timed views


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_dali(shards: ShardSet, batch: int, repeats: int, workers: int, views: int, device: str,
               size: int, augment: bool = True, decode_crop: bool = True,
               torch_resize: bool = True) -> tuple[float, float]:
    """views/s and shard bytes per view of this loader, with the batch augmentation (``augment``) or
    DALI's decode + crops alone; ``decode_crop=False`` decodes a lone view's whole image,
    ``torch_resize=False`` resizes the views with DALI's CPU ``fn.resize`` instead of torch's (`train_graph`)."""
    if device == "cpu":  # DALI's `workers` threads decode and crop; the batch stage gets the main thread
        torch.set_num_threads(1)
    data = DataConfig(batch_size=batch, augment=AugmentConfig(image_size=size),
                      stream=StreamConfig(repeats=repeats, shuffle_buffer=256))
    loader = TrainLoader(shards, data, device=device, threads=workers, dali_threads=workers, decode_crop=decode_crop,
                         torch_resize=torch_resize)
    batch_aug = BatchAugment(data.augment, data.mix, num_classes=int(shards.labels.max()) + 1)
    step = batch_aug if augment else (lambda views, labels, rng: (views, labels))
    batches = iter(loader)
    for _ in range(WARMUP_BATCHES):  # build, first reads, nvJPEG's and the resizes' buffers grown to size
        first = next(batches)
        step(first.views, first.labels, first.rng)
    _sync(device)
    start = time.perf_counter()
    done = 0
    while done < views:
        b = next(batches)
        x, targets = step(b.views, b.labels, b.rng)
        done += len(x)
    _sync(device)
    seconds = time.perf_counter() - start
    metrics = loader.metrics  # bytes per image fetched (read-ahead included), shared by its k views
    return done / seconds, metrics.bytes_read / max(metrics.fetched, 1) / repeats


class PeerTransform:
    """timm's train transform, drawn again when it raises: timm's ``PosterizeIncreasing`` asks recent Pillow
    for 0 bits at magnitude >= 10 (~0.15% of images with m9-mstd0.5), which Pillow refuses with a
    ValueError that would end the peers' DataLoader (see `pipeline.randaugment`). Picklable (spawn)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        for _ in range(10):
            with contextlib.suppress(ValueError):
                return self.transform(image)
        return self.transform(image)


def bench_timm_pil(shards: ShardSet, batch: int, workers: int, views: int, device: str, size: int,
                   augment: bool = True) -> float:
    """views/s of the peers' loader with DeiT's whole transform (``augment``), or with decode + random
    resized crop + flip alone (timm's RandomResizedCropAndInterpolation, bicubic: what DALI's graph does)."""
    import webdataset as wds
    from timm.data import Mixup, create_transform

    if device == "cpu":
        torch.set_num_threads(workers)  # the main process mixes the batch; each worker process has 1 thread
    if augment:
        transform = PeerTransform(create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                                   interpolation="bicubic", re_prob=0.25, re_mode="pixel",
                                                   re_count=1))
    else:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms

        transform = transforms.Compose([RandomResizedCropAndInterpolation(size, interpolation="bicubic"),
                                        transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    fs, root = shards.location.fs_and_path()
    urls = [f"{root}/{name}" for name in shards.shard_names.values()]
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
               .repeat().decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int))
    workers = min(workers, len(urls))  # webdataset gives each worker whole shards: none may go without one
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True,
                                         persistent_workers=False, prefetch_factor=4 if workers else None,
                                         # spawn: no fork after DALI's threads
                                         multiprocessing_context="spawn" if workers else None)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                  num_classes=int(shards.labels.max()) + 1)
    batches = iter(loader)
    next(batches)
    start, done = time.perf_counter(), 0
    while done < views:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device)
        if augment:
            x, y = mixup(x, y)
        done += len(x)
    _sync(device)
    return done / (time.perf_counter() - start)


def bench_resize(shards: ShardSet, workers: int, size: int, images: int = 48,
                 repeats: int = 3) -> tuple[float, float, float]:
    """views/s of the view's cut alone (random resized crop boxes of the recipe, bicubic, antialiased) on
    images decoded beforehand: DALI's ``fn.resize`` as the train graph calls it (``crop_resize``), on
    ``workers`` threads (CPU operators, or the GPU when there is one), torch's as a CPU graph cuts them
    (`pipeline.host_resize.TorchCut`, ``workers`` threads), and PIL's ``Image.resize`` with the same boxes
    on ``workers`` threads (PIL releases the GIL while it resamples)."""
    from concurrent.futures import ThreadPoolExecutor

    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    from pipeline.dali_graph import _interp, crop_resize
    from pipeline.host_resize import TorchCut
    from pipeline.stream import SampleStream
    from pipeline.views import draw_views

    samples = SampleStream(shards, StreamConfig(shuffle_buffer=16), threads=1).take(min(images, len(shards)))
    pictures = [Image.open(io.BytesIO(s.data)).convert("RGB") for s in samples]
    arrays = [np.asarray(p) for p in pictures]
    cfg = AugmentConfig(image_size=size)
    boxes = draw_views(np.random.default_rng(0), np.array([p.width for p in pictures]),
                       np.array([p.height for p in pictures]), repeats, cfg).boxes  # [n, k, 4]
    device_id = 0 if torch.cuda.is_available() else None

    runs = itertools.count()

    def feed() -> tuple[list, list]:  # run r cuts view r % k of every image
        view = next(runs) % repeats
        return arrays, [b[view] for b in boxes]

    @pipeline_def(batch_size=len(arrays), num_threads=workers, device_id=device_id, exec_dynamic=True)
    def graph():
        decoded, box = fn.external_source(source=feed, num_outputs=2, batch=True, layout=["HWC", ""])
        if device_id is not None:
            decoded = decoded.gpu()
        return crop_resize(decoded, box, size, _interp(cfg.interpolation))

    pipe = graph()
    pipe.build()
    pipe.run()
    start = time.perf_counter()
    for _ in range(repeats):
        (out,) = pipe.run()
    if device_id is not None:
        out.as_cpu()
    dali_rate = len(arrays) * repeats / (time.perf_counter() - start)

    cut_by_torch = TorchCut(size, cfg.interpolation, workers)
    cut_by_torch(arrays, [b[0] for b in boxes])  # warm-up, and the pool started
    start = time.perf_counter()
    for v in range(repeats):
        cut_by_torch(arrays, [b[v] for b in boxes])
    torch_rate = len(arrays) * repeats / (time.perf_counter() - start)

    def cut(i: int, v: int) -> Image.Image:
        p, (y0, x0, y1, x1) = pictures[i], boxes[i, v]
        return p.resize((size, size), Image.Resampling.BICUBIC,
                        box=(x0 * p.width, y0 * p.height, x1 * p.width, y1 * p.height))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(cut, range(len(pictures)), [0] * len(pictures)))  # warm-up
        start = time.perf_counter()
        list(pool.map(cut, [i for i in range(len(pictures)) for _ in range(repeats)],
                      [v for _ in range(len(pictures)) for v in range(repeats)]))
    pil_rate = len(pictures) * repeats / (time.perf_counter() - start)
    return dali_rate, torch_rate, pil_rate


def bench_stream(shards_url: str | None = None, images: int = 600, batch: int = 48, workers: int | None = None,
                 views: int = 960, size: int = 224, rounds: int = 5) -> str:
    """The table. The three full-augmentation loaders run in turn ``rounds`` times (dali, dali x3, timm+PIL,
    dali, ...): each rate is the median over the rounds and each ratio the median of the ratios within a
    round, so a machine that slows down or speeds up between loaders (a shared host) moves them less; the
    last column is the range of the per-round ratios. The crop-only and resize rows run once."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: at least one round")
    workers = workers or os.cpu_count() or 1
    device = _device()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        origin = shards_url or "generated ImageNet-like JPEGs"
        if shards_url is None:
            write_imagenet_like(Path(tmp) / "src", images)
            shards_url = str(Path(tmp) / "shards")
            total = sum(f.stat().st_size for f in (Path(tmp) / "src").rglob("*") if f.is_file())
            # 8 MiB shards, but at least two per worker: the peers' loader gives each worker whole shards
            build_shards(BuildConfig(src=str(Path(tmp) / "src"), dst=Location(shards_url),
                                     shard_bytes=max(1 << 16, min(8 << 20, total // (2 * workers))),
                                     workers=workers))
        shards = ShardSet.open(Location(shards_url), "train")
        peer_name = "timm+PIL DataLoader"
        rates: dict[str, list[float]] = {"dali": [], "dali x3": [], peer_name: []}
        bytes_read = {peer_name: float(shards.sizes.mean())}  # per view
        for _ in range(rounds):
            for name, repeats in (("dali", 1), ("dali x3", 3)):
                rate, bytes_read[name] = bench_dali(shards, batch, repeats, workers, views, device, size)
                rates[name].append(rate)
            rates[peer_name].append(bench_timm_pil(shards, batch, workers, views, device, size))
        rows = []
        for name, measured in rates.items():
            ratios = np.array(measured) / np.array(rates[peer_name])  # within each round
            rows.append((name, float(np.median(measured)), bytes_read[name], float(np.median(ratios)),
                         f"{ratios.min():.2f}-{ratios.max():.2f}"))
        # decode + crop alone, the same two ways: where the time goes before any augmentation
        crop_rate, crop_view = bench_dali(shards, batch, 1, workers, views, device, size, augment=False)
        whole_rate, whole_view = bench_dali(shards, batch, 1, workers, views, device, size, augment=False,
                                            decode_crop=False)
        crop3_rate, crop3_view = bench_dali(shards, batch, 3, workers, views, device, size, augment=False)
        # DALI's own CPU resize for the views: the GPU's graph node for node (on a GPU, the rows above)
        dali_rs_rate, _ = bench_dali(shards, batch, 1, workers, views, device, size, augment=False,
                                     torch_resize=False)
        dali_rs3_rate, _ = bench_dali(shards, batch, 3, workers, views, device, size, augment=False,
                                      torch_resize=False)
        peer_crop = bench_timm_pil(shards, batch, workers, views, device, size, augment=False)
        dali_resize, torch_resize, pil_resize = bench_resize(shards, workers, size)
    lines = [f"pipeline bench stream: {len(shards)} images ({shards.sizes.mean() / 1e3:.0f} KB avg, {origin}), "
             f"{size}px, batch {batch}, {workers} workers, device {device}, {rounds} rounds (the loaders in turn; "
             f"medians over rounds)",
             f"{'loader (full DeiT augmentation)':<34}{'views/s':>10}{'KB read/view':>14}{'vs timm+PIL':>13}"
             f"{'per round':>12}"]
    for name, rate, bytes_per_view, ratio, spread in rows:
        lines.append(f"{name:<34}{rate:>10.0f}{bytes_per_view / 1e3:>14.1f}{ratio:>13.2f}{spread:>12}")
    lines.append(f"{'decode + random resized crop only':<34}{'views/s':>10}{'':>14}{'vs timm+PIL':>13}")
    for name, rate, per_view, base in (("dali, crop only", crop_rate, crop_view, peer_crop),
                                       ("dali, crop only, whole decode", whole_rate, whole_view, peer_crop),
                                       ("dali x3, crop only", crop3_rate, crop3_view, peer_crop),
                                       ("dali, crop only, DALI's resize", dali_rs_rate, crop_view, peer_crop),
                                       ("dali x3, crop only, DALI's resize", dali_rs3_rate, crop3_view, peer_crop),
                                       ("timm+PIL, crop only", peer_crop, float(shards.sizes.mean()), peer_crop)):
        lines.append(f"{name:<34}{rate:>10.0f}{per_view / 1e3:>14.1f}{rate / base:>13.2f}")
    lines.append(f"{'resize alone (decoded, same boxes)':<34}{'views/s':>10}{'':>14}{'vs PIL':>13}")
    for name, rate in (("dali fn.resize", dali_resize), ("torch interpolate (the CPU's cut)", torch_resize),
                       ("PIL Image.resize", pil_resize)):
        lines.append(f"{name:<34}{rate:>10.0f}{'':>14}{rate / pil_resize:>13.2f}")
    return "\n".join(lines)
