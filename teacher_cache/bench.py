"""`teacher-cache bench`: is the cache right, and is it fast? Both measured in one run.

Agreement: training views are drawn exactly as in training (stream -> DALI views -> RandAugment, erasing,
Mixup/CutMix); the online teacher labels the augmented (mixed) batch as DeiT does; the cache labels the
same views from their crop boxes (and the batch's mixing lambda). Reported: top-1 agreement of the two
hard labels, for crops only, with the full per-view augmentation, and with Mixup/CutMix on top.

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

from pipeline.batch_aug import BatchAugment
from pipeline.build import BuildConfig, build_shards
from pipeline.config import AugmentConfig, DataConfig, MixConfig, StreamConfig
from pipeline.demo import write_digits_tree
from pipeline.loader import TrainLoader
from pipeline.storage import Location
from pipeline.stream import ShardSet
from teacher_cache.build import CacheBuildConfig, build_cache
from teacher_cache.cache import TeacherCache
from teacher_cache.maps import mixed
from teacher_cache.teacher import Teacher, TeacherSpec

log = logging.getLogger(__name__)


def train_small_teacher(shards: ShardSet, name: str, size: int, steps: int, path: str, device: str) -> None:
    """A real (small) teacher: a few hundred steps of plain crops + flips, no mixing; saved to ``path``."""
    import timm

    classes = int(shards.labels.max()) + 1
    model = timm.create_model(name, pretrained=False, num_classes=classes).to(device)
    data = DataConfig(batch_size=64, augment=AugmentConfig(image_size=size, auto_augment=None, reprob=0.0,
                                                           scale=(0.35, 1.0)),
                      mix=MixConfig(prob=0.0), stream=StreamConfig(repeats=1, shuffle_buffer=512))
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
              device: str) -> float:
    classes = cache.classes
    augment = BatchAugment(data.augment, data.mix, classes)
    batches = iter(TrainLoader(shards, data, device=device))
    same = total = 0
    for _ in range(steps):
        b = next(batches)
        out = augment.apply(b.views, b.labels, b.rng)
        online = teacher.logits(out.x).argmax(1)
        cached = mixed(cache.logits(b.rows, b.boxes, device), out.mix.lam).argmax(1)
        same += int((online == cached).sum())
        total += len(online)
    return same / total


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
    for _ in range(steps):
        b = next(batches)
        prepared.append((b, augment.apply(b.views, b.labels, b.rng)))
    rates = {}
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for mode in ("none", "online", "cache"):
        cfg = DistillLossConfig(kind="none" if mode == "none" else "hard")
        start = time.perf_counter()
        for b, out in prepared:
            teacher_logits = None
            if mode == "online":
                teacher_logits = teacher.logits(out.x)
            elif mode == "cache":
                teacher_logits = mixed(cache.logits(b.rows, b.boxes, device), out.mix.lam)
            with autocast:
                loss = distillation_loss(model(out.x), out.targets, teacher_logits, cfg).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        rates[mode] = len(prepared) * batch / (time.perf_counter() - start)
    return rates


def bench(shards_url: str | None = None, teacher_name: str = "resnet10t", weights: str | None = None,
          resolution: int = 64, topk: int = 5, teacher_steps: int = 300, steps: int = 20, size: int = 32,
          student: str = "deit_tiny_patch16_224", batch: int = 48) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        origin = shards_url or "scikit-learn digits"
        if shards_url is None:
            write_digits_tree(Path(tmp) / "digits", size=size)
            shards_url = str(Path(tmp) / "shards")
            build_shards(BuildConfig(src=str(Path(tmp) / "digits"), dst=Location(shards_url), shard_bytes=200_000))
        shards = ShardSet.open(Location(shards_url), "train")
        classes = int(shards.labels.max()) + 1
        if weights is None:
            weights = str(Path(tmp) / "teacher.pt")
            train_small_teacher(shards, teacher_name, size, teacher_steps, weights, device)
        spec = TeacherSpec(teacher_name, weights, classes, resolution)
        cache_url = str(Path(tmp) / "cache")
        info = build_cache(CacheBuildConfig(shards=Location(shards_url), out=Location(cache_url), teacher=spec,
                                            topk=topk))
        teacher = Teacher(replace(spec), device)
        cache = TeacherCache(Location(cache_url), shards, teacher.identity)
        base = DataConfig(batch_size=batch, augment=AugmentConfig(image_size=size),
                          stream=StreamConfig(repeats=3, shuffle_buffer=512))
        crops_only = replace(base, augment=replace(base.augment, auto_augment=None, reprob=0.0),
                             mix=MixConfig(prob=0.0))
        full_no_mix = replace(base, mix=MixConfig(prob=0.0))
        rows = [("crops + flips only", agreement(shards, cache, teacher, crops_only, steps, device)),
                ("+ RandAugment, erasing", agreement(shards, cache, teacher, full_no_mix, steps, device)),
                ("+ Mixup/CutMix (DeiT)", agreement(shards, cache, teacher, base, steps, device))]
        rates = step_rates(shards, cache, teacher, student, size, batch, steps, device)
    lines = [
        f"teacher-cache bench: {origin}, {len(shards)} images, teacher {teacher_name} at {resolution}px "
        f"(map {info['map']['height']}x{info['map']['width']}, top-{topk}), device {device}",
        f"storage: {info['bytes_per_image']} bytes/image in memory, {info['bytes'] / info['num_samples']:.0f} "
        f"bytes/image on disk",
        f"{'cached vs online hard label, same views':<44}{'agreement':>10}",
        *[f"{name:<44}{value:>10.1%}" for name, value in rows],
        f"{'student step (' + student + ')':<44}{'img/s':>10}{'vs none':>9}",
        *[f"{mode + ' teacher':<44}{rate:>10.0f}{rate / rates['none']:>9.2f}" for mode, rate in rates.items()],
    ]
    return "\n".join(lines)
