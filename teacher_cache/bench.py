"""`teacher-cache bench`: is the cache right, and is it fast? Both measured in one run.

Agreement: training views are drawn exactly as in training (stream -> DALI views -> RandAugment, erasing,
Mixup/CutMix); the online teacher labels the augmented (mixed) batch as DeiT does; the cache labels the
same views from their crop boxes (and the batch's mixing lambda). Reported: top-1 agreement of the two
hard labels, for crops only, with the full per-view augmentation, and with Mixup/CutMix on top; beside
it, what one label per image and what replayed views (the other design issue 4 names: pre-drawn crops
with the teacher's exact outputs stored) would agree. On the digits the crop hardly changes the label; on
``data="mosaic"`` (`pipeline.demo.write_mosaic_tree`) it does, as on ImageNet photos.

Speed: a student train step (bf16 on a GPU) with no teacher, with the online teacher's forward on the
same batch, and with the cache's lookup, on the same batches; the ratio to no-teacher is the point.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.batch_aug import BatchAugment, normalize
from pipeline.build import BuildConfig, build_shards
from pipeline.config import AugmentConfig, DataConfig, MixConfig, StreamConfig
from pipeline.demo import IMAGE_SETS
from pipeline.loader import TrainLoader
from pipeline.storage import Location
from pipeline.stream import ShardSet
from teacher_cache.build import CacheBuildConfig, build_cache
from teacher_cache.cache import TeacherCache
from teacher_cache.maps import mixed
from teacher_cache.teacher import Teacher, TeacherSpec

log = logging.getLogger(__name__)


def train_small_teacher(shards: ShardSet, name: str, size: int, steps: int, path: str, device: str) -> None:
    """A real (small) teacher, a few hundred steps, saved to ``path``, with the students' per-view
    augmentation (random resized crops, RandAugment, erasing; no mixing, so hard targets), as DeiT's
    RegNetY-16GF was trained "with the same data and same data-augmentation as DeiT". Seeded: a re-run
    trains the same teacher."""
    import timm

    classes = int(shards.labels.max()) + 1
    with torch.random.fork_rng(devices=[]):  # the same initial weights every run; the caller's RNG untouched
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=classes).to(device)
    data = DataConfig(batch_size=64, augment=AugmentConfig(image_size=size), mix=MixConfig(prob=0.0),
                      stream=StreamConfig(repeats=1, shuffle_buffer=512))
    augment = BatchAugment(data.augment, data.mix, classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    batches = iter(TrainLoader(shards, data, device=device))
    model.train()
    for step in range(steps):
        b = next(batches)
        x, targets = augment(b.views, b.labels, b.rng)
        loss = torch.nn.functional.cross_entropy(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            log.info("teacher step %d loss %.3f", step, loss.item())
    torch.save(model.state_dict(), path)


@torch.no_grad()
def agreement(shards: ShardSet, cache: TeacherCache, teacher: Teacher, data: DataConfig, steps: int,
              device: str) -> tuple[float, float, float, float, float]:
    """Top-1 agreement with the online teacher's hard label on the same augmented views, of the cache
    answering (a) from each view's crop box and (b) from the whole image (the box ignored: what an
    image-level cache, one label per image, would answer); (a) > (b) is what crop-awareness buys. (c) The
    same for a replay cache, which stores the teacher's exact output on each pre-drawn crop (flip included,
    before RandAugment and erasing, which a replay cannot foresee cheaply) and mixes it like the map's; its
    teacher is run here on those crops. (d) The online teacher's top-1 against the true label of the view's
    image (of the image mixed in with the larger share under Mixup/CutMix), and (e) the cache's (by crop
    box): where (a) is low but (e) high, the two disagree where the online teacher is wrong about the image,
    not the cache."""
    classes = cache.classes
    augment = BatchAugment(data.augment, data.mix, classes)
    batches = iter(TrainLoader(shards, data, device=device))
    same_box = same_whole = same_replay = right = cache_right = total = 0
    for _ in range(steps):
        b = next(batches)
        out = augment.apply(b.views, b.labels, b.rng)
        online = teacher.logits(out.x).argmax(1)
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(b.boxes), 4)
        by_box = mixed(cache.logits(b.rows, b.boxes, device), out.mix.lam).argmax(1)
        by_image = mixed(cache.logits(b.rows, whole, device), out.mix.lam).argmax(1)
        by_replay = mixed(teacher.logits(normalize(b.views, data.augment)), out.mix.lam).argmax(1)
        same_box += int((online == by_box).sum())
        same_whole += int((online == by_image).sum())
        same_replay += int((online == by_replay).sum())
        truth = b.labels.to(online.device) if out.mix.lam >= 0.5 else b.labels.flip(0).to(online.device)
        right += int((online == truth).sum())
        cache_right += int((by_box == truth).sum())
        total += len(online)
    return same_box / total, same_whole / total, same_replay / total, right / total, cache_right / total


def step_rates(shards: ShardSet, cache: TeacherCache, teacher: Teacher, student: str, size: int, batch: int,
               steps: int, device: str) -> dict[str, float]:
    """img/s of student train steps: no teacher, online teacher, cached teacher (same batches)."""
    import timm

    from trainer.losses import DistillLossConfig, distillation_loss

    classes = cache.classes
    model = timm.create_model(student, pretrained=False, num_classes=classes, img_size=size, patch_size=4).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = DataConfig(batch_size=batch, augment=AugmentConfig(image_size=size, auto_augment=None),
                      stream=StreamConfig(repeats=3, shuffle_buffer=512))
    augment = BatchAugment(data.augment, data.mix, classes)
    batches = iter(TrainLoader(shards, data, device=device))
    prepared = []
    for _ in range(max(steps, 2)):  # the first is the untimed warm-up of each mode
        b = next(batches)
        prepared.append((b, augment.apply(b.views, b.labels, b.rng)))
    rates = {}
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step(mode: str, b, out) -> None:
        teacher_logits = None
        if mode == "online":
            teacher_logits = teacher.logits(out.x)
        elif mode == "cache":
            teacher_logits = mixed(cache.logits(b.rows, b.boxes, device), out.mix.lam)
        cfg = DistillLossConfig(kind="none" if mode == "none" else "hard")
        with autocast:
            loss = distillation_loss(model(out.x), out.targets, teacher_logits, cfg).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for mode in ("none", "online", "cache"):
        step(mode, *prepared[0])  # untimed: the mode's first kernels, allocations, the cache's first parts
        if device == "cuda":  # and the batches' augmentation, queued above, is not in the first mode's time
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b, out in prepared[1:]:
            step(mode, b, out)
        if device == "cuda":
            torch.cuda.synchronize()
        rates[mode] = (len(prepared) - 1) * batch / (time.perf_counter() - start)
    return rates


def bench(shards_url: str | None = None, teacher_name: str = "resnet10t", weights: str | None = None,
          resolution: int | None = None, topk: int = 5, teacher_steps: int = 300, steps: int = 20,
          size: int | None = None, student: str = "deit_tiny_patch16_224", batch: int = 48,
          data: str = "digits") -> str:
    """``data``: the generated set when no ``shards_url`` is given ("digits", or "mosaic": digits with a
    small distractor of another class, where the crop changes the label); ``size``: its side and the train
    views' (default 32 for digits, 64 for mosaic)."""
    if data not in IMAGE_SETS:
        raise ValueError(f"data={data!r}: choose one of {', '.join(IMAGE_SETS)}")
    write_tree, default_size = IMAGE_SETS[data]
    size = size or default_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolution = resolution or size  # the teacher sees whole images at the scale it was trained on
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        origin = shards_url or f"scikit-learn digits{' with a distractor (mosaic)' if data == 'mosaic' else ''}"
        if shards_url is None:
            write_tree(Path(tmp) / "images", size=size)
            shards_url = str(Path(tmp) / "shards")
            build_shards(BuildConfig(src=str(Path(tmp) / "images"), dst=Location(shards_url), shard_bytes=200_000))
        shards = ShardSet.open(Location(shards_url), "train")
        classes = int(shards.labels.max()) + 1
        if weights is None:
            weights = str(Path(tmp) / "teacher.pt")
            train_small_teacher(shards, teacher_name, size, teacher_steps, weights, device)
        spec = TeacherSpec(teacher_name, weights, classes, resolution)
        cache_url = str(Path(tmp) / "cache")
        info = build_cache(CacheBuildConfig(shards=Location(shards_url), out=Location(cache_url), teacher=spec,
                                            topk=topk, workers=0))  # in-process: the same cache as Ray's
        teacher = Teacher(replace(spec), device)
        cache = TeacherCache(Location(cache_url), shards, teacher.identity)
        base = DataConfig(batch_size=batch, augment=AugmentConfig(image_size=size),
                          stream=StreamConfig(repeats=3, shuffle_buffer=512))
        crops_only = replace(base, augment=replace(base.augment, auto_augment=None, reprob=0.0),
                             mix=MixConfig(prob=0.0))
        full_no_mix = replace(base, mix=MixConfig(prob=0.0))
        rows = [("crops + flips only", *agreement(shards, cache, teacher, crops_only, steps, device)),
                ("+ RandAugment, erasing", *agreement(shards, cache, teacher, full_no_mix, steps, device)),
                ("+ Mixup/CutMix (DeiT)", *agreement(shards, cache, teacher, base, steps, device))]
        rates = step_rates(shards, cache, teacher, student, size, batch, steps, device)
    lines = [
        f"teacher-cache bench: {origin}, {len(shards)} images, teacher {teacher_name} at {resolution}px "
        f"(map {info['map']['height']}x{info['map']['width']}, top-{topk}), device {device}",
        f"storage: {info['bytes_per_image']} bytes/image in memory, {info['bytes'] / info['num_samples']:.0f} "
        f"bytes/image on disk",
        f"{'agreement with the online hard label, same views':<52}{'cache: crop box':>16}{'whole image':>13}"
        f"{'replayed crop':>15}{'online vs truth':>17}{'cache vs truth':>16}",
        *[f"{name:<52}{box:>16.1%}{whole:>13.1%}{replay:>15.1%}{truth:>17.1%}{cached:>16.1%}"
          for name, box, whole, replay, truth, cached in rows],
        f"{'student step (' + student + ')':<52}{'img/s':>16}{'vs none':>13}",
        *[f"{mode + ' teacher':<52}{rate:>16.0f}{rate / rates['none']:>13.2f}" for mode, rate in rates.items()],
    ]
    return "\n".join(lines)
