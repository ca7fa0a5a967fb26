"""``python -m trainer.bench_gpu``: issue 8's one-GPU benchmark, every row in one process and one run.

No Ray and no MLflow: the GPU machines this project is lent have neither, and a row through Ray Train is
``python -m trainer.bench``'s job. Each row builds the trainer's own pieces here (`trainer.worker`'s
``Parts`` and ``train_step``, `pipeline.loader.TrainLoader`, the teacher cache) and times them as the
trainer logs them: views (images x repeats) per second, and the data-wait fraction, the share of step
time spent in ``next(batches)``. Weights are random, student and teacher: nothing is downloaded and step
time does not depend on them. Data: generated ImageNet-like JPEGs (~460x350 px, ~100 KB; speed only).

1. **model only**, per model (DeiT-Ti/S/B, DeiT-S/B distilled, CaiT-XXS24, CaiT-S24): one random uint8
   batch kept on the device and the recipe's whole step (batch augmentation, forward, loss, backward,
   optimizer; a distilled model gets constant teacher logits): img/s, MFU (the step's FLOPs counted by
   torch's ``FlopCounterMode``, against the device's dense bf16 peak) and peak memory; eager, and for the
   ``--compile`` models (default DeiT-S, CaiT-XXS24, CaiT-S24) also ``torch.compile``'d (``--compile-scope``,
   default auto: CaiT per block, DeiT whole; CaiT-XXS24 then also whole, to show what the scope costs;
   each compiled row's note gives its first step's time). The CaiTs again
   with ``model.talking_heads=sdpa`` (their talking-heads attention through one fused attention call,
   ``trainer.talking_heads``), eager and compiled: the CaiT goal is a step >= 2x timm's eager one.
2. **full pipeline**, DeiT-S and DeiT-B distilled: shards on local disk -> stream -> DALI -> batch
   augmentation -> teacher -> step, repeats 3 and 1, with the cached teacher (RegNetY-16GF, built here
   with ``teacher-cache build --workers 0``) and with the online one.
   The first model's cached x3 row again with the student compiled (``--compile`` not empty), after
   the DALI rows. Before them, the teacher cache build (``--workers 0``) timed over the generated images, and the
   teacher's bf16 forward alone at the build's batch (issue 4: build >= 0.90 x inference). Late in
   the run, the first model's x3 row with a replay cache of its own crops (``REPLAY_VIEWS`` per image;
   the note gives the replay build's rate). Last of all, its online x3 row with the teacher compiled
   (``distill.compile_teacher=true``; with ``--compile`` not empty).
3. **peers**: timm's ``create_transform`` with PIL in a torch DataLoader (one worker process per core)
   reading the same shard bytes, timm's Mixup, the online teacher and the same step, as DeiT's code trains.
4. **DALI alone**: decode + random resized crop (the crop decoded alone, and the whole image decoded as
   its baseline), the same with the whole batch augmentation, and decode once -> 3 views.
5. **checkpoints**: the largest model's model-only step with a checkpoint every ``--steps // 3`` steps,
   written on the training thread and in the background (``checkpoint.background``).
6. **remote teacher**: ``distill.source=remote``'s send path without Ray: batches copied to pinned host
   memory on a side stream and handed to a stand-in actor, checked against a plain copy.
7. **profile**: where the first pipeline model's step time goes (full pipeline, cached teacher, x3):
   device time per step of each phase (augment, teacher, student forward + backward, optimizer) and the
   top kernels; the profiler's whole table beside the written one (``--write PATH``: PATH.profile.txt).

``--write BENCHMARKS.md`` appends the table with the date and the device's name. ``--quick`` is the
CI-sized run (tiny steps and images: it checks that every row runs, not how fast).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trainer.config import COMPILE_SCOPES, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["MODELS", "PIPELINE_MODELS", "GOALS", "GpuRow", "peak_flops", "run_suite", "main"]

MODELS = ("deit_ti", "deit_s", "deit_b", "deit_s_distill", "deit_b_distill", "cait_xxs24", "cait_s24")
PIPELINE_MODELS = ("deit_s_distill", "deit_b_distill")
# issue 8's goals on one H100 (img/s of the full pipeline with the cached teacher), data wait <= 5%
GOALS = {"deit_s_distill": 4700.0, "deit_b_distill": 3000.0}
MAX_DATA_WAIT = 0.05
# dense bf16 tensor-core peaks (NVIDIA's datasheets; the sparse figures are twice these), by device name
_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989.4e12),
          ("H200", 989.4e12), ("H800", 989.4e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12))


DALI_STOCK_RA = "DALI stock rand_augment n=2 m=9 (baseline)"
COMPILE_SECONDS = 120.0  # a compiled row is not started with less than this left before --max-seconds
WHOLE_MODEL_COMPILE_SECONDS = 240.0  # CaiT-XXS24's 24 + 2 blocks compiled as one graph, not one block's
PROFILE_SECONDS = 60.0  # the profile row: its pipeline's start-up, warm-up and the profiled steps


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (``torch.cuda.get_device_name``), None if unknown."""
    for key, value in _PEAKS:
        if key in device_name:
            return value
    return None


@dataclass(frozen=True)
class GpuRow:
    section: str
    name: str
    views_per_s: float | None
    data_wait: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Settings:
    batch: int  # views per step (per GPU)
    steps: int
    warmup: int
    images: int  # generated JPEGs for the pipeline rows
    size: int  # resolution of every recipe
    teacher: str | None  # timm name replacing the recipes' RegNetY-16GF (tests), None: the recipe's
    models: tuple[str, ...]
    pipeline_models: tuple[str, ...]
    compiled: tuple[str, ...]  # models also timed torch.compile'd
    threads: int  # loader threads, DALI threads, peer DataLoader workers
    overrides: tuple[str, ...]
    max_seconds: float = 1e9  # rows that would start later are reported "not run"
    started_at: float | None = None  # time.time() that max_seconds counts from (None: run_suite's start)
    compile_scope: str = "auto"  # runtime.compile_scope of every recipe (--compile-scope)
    s3: bool = False  # also the rows through the local S3-protocol store (needs s3fs and moto)


# ---------------------------------------------------------------------------------------------- one row


def _recipe(name: str, s: Settings) -> TrainConfig:
    from trainer.overrides import apply_overrides
    from trainer.recipes import get

    config = get(name)
    extra = [f"data.batch_size={s.batch}", "scaling.num_workers=1", f"scaling.use_gpu={torch.cuda.is_available()}",
             f"runtime.compile_scope={s.compile_scope}",
             f"model.img_size={s.size}", f"data.augment.image_size={s.size}", "model.pretrained_path=None"]
    if config.distill.kind != "none":
        extra += [f"distill.teacher.img_size={s.size}"] + ([f"distill.teacher.name={s.teacher}"] if s.teacher else [])
    return apply_overrides(config, [*extra, *s.overrides])


def _synthetic(config: TrainConfig, device: torch.device) -> Iterator:
    """One random batch of the loader's shape and layout on the device, handed out at every step."""
    from pipeline.loader import plan_batch
    from trainer.worker import synthetic_batches

    images = plan_batch(config.data.batch_size, 1, config.data.stream.repeats, even=config.data.mix.enabled)
    return synthetic_batches(config, device, images, torch.Generator().manual_seed(0))


def _time(p, batches: Iterator, s: Settings, step=None,
          during: contextlib.AbstractContextManager | None = None) -> tuple[float, float, float | None]:
    """(views/s, data-wait fraction, peak GiB) over ``s.steps`` steps after ``s.warmup``, as the trainer times;
    ``during``: a context (a profiler) entered for the timed steps only."""
    from trainer.worker import _Timer, train_step

    step = step or (lambda batch: train_step(p, batch))
    timer = _Timer()
    cuda = p.device.type == "cuda"
    with contextlib.ExitStack() as timed:
        for i in range(s.warmup + s.steps):
            if i == s.warmup:
                if during is not None:
                    timed.enter_context(during)
                timer.measure(p.device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(p.device)
            batch = timer.wait(batches)
            step(batch)
            p.step += 1
            timer.stepped(_views(batch))
        timer.settle(p.device)
    m = timer.measured
    peak = torch.cuda.max_memory_allocated(p.device) / 2**30 if cuda else None
    return m["views"] / m["step_s"], m["wait_s"] / m["step_s"], peak


def _views(batch) -> int:
    return len(batch.keys) if hasattr(batch, "keys") else len(batch[0])


def _step_flops(p, batch) -> float:
    """FLOPs of one whole train step (forward and backward of student and teacher), per view."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.worker import train_step

    with FlopCounterMode(display=False) as counter:
        train_step(p, batch)
    return counter.get_total_flops() / _views(batch)


# ---------------------------------------------------------------------------------------------- sections


# The order rows run in (lowest first; the table keeps section order): what the goals and their
# baselines need first, so that a run cut short by --max-seconds loses the rows no goal depends on.
FIRST, GOAL, DALI, COMPILED, MORE, LAST = range(6)


class _Rows:
    """The table: rows are added in table order with a priority and measured by :meth:`run` in priority
    order (then table order). A row that raises is kept as "failed: ..." and the next one runs (a lent
    GPU's minutes are few: one broken row must not cost the rest); past the deadline rows are "not run".
    Each row is logged as it completes, so a run cut short still says what it measured."""

    def __init__(self, deadline: float, on_row: Callable[[list[GpuRow]], None] | None = None) -> None:
        self.deadline = deadline
        self.on_row = on_row  # called with the rows measured so far (table order) after each one
        self._queued: list[tuple[int, str, str, Callable[[], GpuRow], float]] = []
        self._done: dict[int, GpuRow] = {}

    @property
    def rows(self) -> list[GpuRow]:
        """The rows measured so far, in table order."""
        return [self._done[i] for i in sorted(self._done)]

    def add(self, section: str, name: str, measure: Callable[[], GpuRow], min_seconds: float = 0.0,
            priority: int = MORE) -> None:
        """``min_seconds``: the least time the row needs (a compile); it is not started with less left."""
        self._queued.append((priority, section, name, measure, min_seconds))

    def run(self) -> list[GpuRow]:
        """Measure every queued row (the rows a measurement queues run in this call too); the table."""
        while len(self._done) < len(self._queued):
            i = min((i for i in range(len(self._queued)) if i not in self._done), key=lambda i: self._queued[i][0])
            _, section, name, measure, min_seconds = self._queued[i]
            self._done[i] = self._measure(section, name, measure, min_seconds)
            if self.on_row is not None:
                try:
                    self.on_row(self.rows)
                except Exception:  # noqa: BLE001 - the partial table is a convenience; the rows go on
                    log.exception("bench_gpu: writing the partial table failed")
        return self.rows

    def _measure(self, section: str, name: str, measure: Callable[[], GpuRow], min_seconds: float) -> GpuRow:
        if time.monotonic() + min_seconds > self.deadline:
            return GpuRow(section, name, None, note="not run: --max-seconds reached")
        started = time.monotonic()
        try:
            row = measure()
        except Exception as exc:  # noqa: BLE001 - reported in the table, the suite goes on
            log.exception("bench_gpu: %s / %s failed", section, name)
            row = GpuRow(section, name, None, note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")
        log.info("bench_gpu row (%.0f s): %s", time.monotonic() - started, row)
        return row


SDPA_TALKING_HEADS = ", sdpa talking heads"  # a CaiT row's suffix with model.talking_heads=sdpa
WHOLE_MODEL = ", whole model"  # a compiled row's suffix with runtime.compile_scope=model, beside a per-block one
_VARIANTS = {"": (), SDPA_TALKING_HEADS: ("model.talking_heads=sdpa",), WHOLE_MODEL: ("runtime.compile_scope=model",)}


def _model_only(s: Settings, device: torch.device, peak: float | None, rows: _Rows, compiled: bool,
                flops: dict[str, float]) -> None:
    """``flops``: FLOPs per view by model, counted once on the eager step with timm's layers and shared with
    the compiled and the fused-attention rows (MFU counts the model's work, not the fused path's extra).
    A compiled row's note gives its first step's time, the compile's cost."""
    from trainer.worker import _sync, local_parts, resolve_compile_scope, train_step

    def measure(name: str, compile_model: bool, variant: str) -> GpuRow:
        config, p, teacher, batches = _model_parts(name, s, device, compile_model, _VARIANTS[variant])
        notes = []
        if variant == SDPA_TALKING_HEADS:  # these kernels and strides run nowhere else: their numbers first
            from trainer.talking_heads import check_against_timm

            notes.append(f"bf16 error {check_against_timm(p.model, device):.2f}x timm's own (checked first)")
        if compile_model:  # a cold compile: no graph another row compiled (CaiT's class attention) serves this one
            torch._dynamo.reset()
            started = time.perf_counter()
            train_step(p, next(batches))
            _sync(device)
            scope = resolve_compile_scope(getattr(p.model, "_orig_mod", p.model), config.runtime.compile_scope)
            notes.append(f"first step {time.perf_counter() - started:.1f} s (compile, scope {scope})")
        if name not in flops:  # counted on the eager step of timm's layers (the same mathematics compiled)
            eager = p if not compile_model and not variant else local_parts(_recipe(name, s), device, teacher)
            flops[name] = _step_flops(eager, next(batches))
            del eager
        rate, wait, mem = _time(p, batches, s)
        _free(device)
        mfu = rate * flops[name] / peak if peak else None
        return GpuRow("model only", _model_row(name, compile_model, variant), rate, wait, mfu, mem,
                      "; ".join([f"{config.model.name}, {flops[name] / 1e9:.1f} GFLOP/view (step)", *notes]))

    scope = s.compile_scope
    for name in (m for m in s.models if not compiled or m in s.compiled):
        # CaiT's talking-heads attention also through the fused call (trainer.talking_heads): the CaiT goal
        # is a step >= 2x timm's eager one, by compiling, by the fused path, or both
        variants = ["", SDPA_TALKING_HEADS] if name.startswith("cait") else [""]
        if compiled and name == "cait_xxs24" and scope != "model":  # CaiT's blocks are alike: per block
            variants.append(WHOLE_MODEL)  # beside it, what the whole model's compile costs and gives
        for variant in variants:
            if compiled:  # the CaiT goal is compiled / eager
                priority = COMPILED if name.startswith("cait") else LAST
            elif variant == SDPA_TALKING_HEADS:
                priority = COMPILED
            else:  # the baselines of the goals' ratios
                priority = GOAL if name in s.pipeline_models or name.startswith("cait") or name == "deit_s" else MORE
            rows.add("model only", _model_row(name, compiled, variant),
                     lambda n=name, v=variant: measure(n, compiled, v),
                     min_seconds=0.0 if not compiled else WHOLE_MODEL_COMPILE_SECONDS if variant == WHOLE_MODEL
                     else COMPILE_SECONDS, priority=priority)


def _model_row(name: str, compiled: bool, variant: str = "") -> str:
    return f"{name}{variant}{' compiled' if compiled else ''}"


def _model_parts(name: str, s: Settings, device: torch.device, compile_model: bool = False,
                 overrides: Sequence[str] = ()):
    """(config, parts, teacher, batches) of a model-only row: the recipe's step on one random batch kept on
    the device (``overrides`` on top of the recipe); a distilled model gets constant teacher logits."""
    from trainer.overrides import apply_overrides
    from trainer.worker import _ConstantTeacher, local_parts

    config = apply_overrides(_recipe(name, s), list(overrides))
    teacher = None
    if config.distill.kind != "none":
        views = len(next(_synthetic(config, device)).keys)
        teacher = _ConstantTeacher(torch.randn(views, config.model.num_classes, device=device))
    return config, local_parts(config, device, teacher, compile_model=compile_model), teacher, _synthetic(config,
                                                                                                        device)


GPU_CHECKPOINT_LABELS = {False: "checkpoints on the training thread", True: "checkpoints in the background"}


def _checkpoints(s: Settings, device: torch.device, root: Path, rows: _Rows) -> None:
    """The model-only step of the largest model, with a checkpoint every ``s.steps // 3`` timed steps
    written to local disk on the training thread, then in the background (the trainer's
    ``checkpoint.background``: a copy to host memory on the training thread, the write on another).
    Ray's copy to the run's storage and its commit are not here (no Ray on this machine): they add to the
    training thread's share only when it writes."""
    import functools

    from trainer.background import Background
    from trainer.checkpoint import capture_rng, save_checkpoint
    from trainer.worker import train_state, train_step

    name = next((m for m in ("deit_b_distill", "deit_b") if m in s.models), s.models[0] if s.models else None)
    if name is None:
        return
    every = max(1, s.steps // 3)

    def measure(background: bool) -> GpuRow:
        _, p, _, batches = _model_parts(name, s, device)
        writer, folder = Background("bench-checkpoint"), root / f"checkpoints-{background}"
        spent = {"stall_s": 0.0, "wait_s": 0.0, "written": 0}

        def step(batch) -> None:
            train_step(p, batch)
            measured = p.step + 1 - s.warmup  # _time counts the step after this call
            if 0 < measured < s.steps and measured % every == 0:
                started = time.perf_counter()
                spent["wait_s"] += writer.wait()
                state = train_state(p, [{"loader": {}, "rng": capture_rng()}], copy=background)
                state = dataclasses.replace(state, step=p.step + 1)  # _time counts this step after the call
                job = functools.partial(save_checkpoint, state, folder)
                if background:
                    writer.submit(job)
                else:
                    job()
                spent["stall_s"] += time.perf_counter() - started
                spent["written"] += 1
            elif measured == s.steps:  # the last write's rest counts too
                waited = writer.wait()
                spent["wait_s"] += waited
                spent["stall_s"] += waited

        rate, wait, mem = _time(p, batches, s, step)
        writer.wait()
        size = max(sum(f.stat().st_size for f in d.iterdir()) for d in folder.iterdir() if d.name.startswith("step-"))
        _free(device)  # what this row's parts hold goes at the next row's
        return GpuRow("checkpoints", f"{name}, {GPU_CHECKPOINT_LABELS[background]}", rate, wait, None, mem,
                      f"every {every} steps, {size / 1e6:.0f} MB each to local disk; {spent['written']} written, "
                      f"{spent['stall_s'] / max(spent['written'], 1):.3f} s each on the training thread "
                      f"({spent['wait_s']:.2f} s in all waiting for a write still running)")

    for background in (False, True):
        rows.add("checkpoints", f"{name}, {GPU_CHECKPOINT_LABELS[background]}", lambda b=background: measure(b),
                 priority=LAST)


def _pipeline_parts(s: Settings, device: torch.device, base: TrainConfig, weights: str, cache: str, source: str,
                    repeats: int, where, compile_model: bool = False):
    """(parts, loader) of a full-pipeline row: ``where``'s shards -> stream -> DALI -> the step, with the
    ``source`` teacher (``cache``: the cache built from ``weights``)."""
    from pipeline.loader import TrainLoader
    from trainer.overrides import apply_overrides
    from trainer.worker import build_teacher, local_parts

    url = where.location.url
    config = apply_overrides(base, [f"distill.source={source}", f"distill.cache_url={cache}",
                                    f"distill.teacher.pretrained_path={weights}", f"data.stream.repeats={repeats}",
                                    f"data.train_url={url}", f"data.val_url={url}"])
    teacher, _ = build_teacher(config, device, where)
    data_device = "cpu" if device.type == "cpu" else str(device)
    loader = TrainLoader(where, config.data, 1, 0, data_device, threads=s.threads, dali_threads=s.threads)
    return local_parts(config, device, teacher, steps_per_epoch=loader.steps_per_epoch,
                       compile_model=compile_model), loader


def _pipeline_row(s: Settings, device: torch.device, base: TrainConfig, name: str, weights: str, cache: str,
                  source: str, repeats: int, where, store: str = "local disk", compile_model: bool = False) -> GpuRow:
    """One full-pipeline row (``compile_model``: the student torch.compile'd)."""
    p, loader = _pipeline_parts(s, device, base, weights, cache, source, repeats, where, compile_model)
    rate, wait, mem = _time(p, iter(loader), s)
    del p, loader
    _free(device)
    suffix = ("" if store == "local disk" else ", S3") + (", compiled" if compile_model else "")
    return GpuRow("full pipeline", f"{name}, {source} teacher, x{repeats}{suffix}", rate, wait, None, mem,
                  f"shards ({store}) -> stream -> DALI -> batch aug -> teacher -> {'compiled ' * compile_model}step")


REPLAY_VIEWS = 6  # crops per image of the replay row's cache: its build costs that many teacher passes an image


def _replay_row(s: Settings, device: torch.device, base: TrainConfig, name: str, weights: str, shards_url: str,
                shards, out: Path) -> GpuRow:
    """The full pipeline (x3) with a replay cache of the run's own crops: its build (R teacher passes per
    image, start-up included) and then the step rate, whose lookup reads one stored cell a view."""
    from trainer.bench import _random_teacher_cache
    from trainer.overrides import apply_overrides

    replayed = apply_overrides(base, [f"data.augment.replay_views={REPLAY_VIEWS}"])
    started = time.perf_counter()
    cache = _random_teacher_cache(replayed, shards_url, weights, out, workers=0)
    seconds = time.perf_counter() - started
    row = _pipeline_row(s, device, replayed, name, weights, cache, "cache", 3, shards)
    return replace(row, name=f"{name}, replay cache teacher, x3",
                   note=f"{row.note}; its cache of {REPLAY_VIEWS} crops per image built in {seconds:.1f} s "
                        f"({s.images * REPLAY_VIEWS / seconds:.0f} views/s, start-up included)")


def _pipeline(s: Settings, device: torch.device, root: Path, shards_url: str, rows: _Rows,
              stack: contextlib.ExitStack) -> dict[str, tuple]:
    """The full-pipeline and peers rows; returns each model's (recipe, () -> (teacher weights, cache), shards),
    the second known once its build row has run. ``stack`` keeps the S3 store open until the suite ends."""
    from pipeline.storage import Location
    from pipeline.stream import ShardSet

    shards = ShardSet.open(Location(shards_url), "train")

    def measure(base: TrainConfig, name: str, weights: str, cache: str, source: str, repeats: int,
                where: ShardSet = shards, store: str = "local disk") -> GpuRow:
        return _pipeline_row(s, device, base, name, weights, cache, source, repeats, where, store)

    teachers: dict[tuple, tuple[str, str]] = {}  # one random teacher and cache per teacher identity
    built: dict[str, tuple] = {}
    for name in s.pipeline_models:
        base = _recipe(name, s)
        t = base.distill.teacher
        key = (t.name, t.img_size, base.model.num_classes)
        if key not in teachers:
            # replaced by the build row; if it fails, the cache rows fail and the online ones still run
            teachers[key] = str(root / name / "teacher-random.pth"), "not built (see the teacher rows)"
            label = f"{t.name}@{t.img_size}"

            def build(b: TrainConfig = base, k: tuple = key, n: str = name, label: str = label) -> GpuRow:
                from teacher_cache.build import CacheBuildConfig

                weights, cache, seconds = _random_teacher(b, shards_url, root / n)
                teachers[k] = weights, cache
                return GpuRow("teacher", f"{label} cache build, whole job", s.images / seconds,
                              note=f"teacher-cache build --workers 0 over {s.images} images, batch "
                                   f"{CacheBuildConfig.batch_size}, start-up included (teacher, DALI graph, "
                                   f"CUDA): DALI decode -> bf16 logit maps -> top-k -> parquet")

            rows.add("teacher", f"{label} cache build, whole job", build, priority=FIRST)  # the cache rows read it
            rows.add("teacher", f"{label} cache build", lambda b=base, k=key, n=name, label=label:
                     _cache_build_rate(s, device, b, teachers[k][0], shards_url, root / n / "rate", label),
                     priority=GOAL)
            rows.add("teacher", f"{label} bf16 inference alone",
                     lambda b=base, k=key, label=label: _teacher_inference(s, device, b, teachers[k][0], label),
                     priority=GOAL)
        built[name] = (base, key)
        for source in ("cache", "online"):
            for repeats in (3, 1):
                rows.add("full pipeline", f"{name}, {source} teacher, x{repeats}",
                         lambda b=base, n=name, k=key, src=source, r=repeats: measure(b, n, *teachers[k], src, r),
                         priority=GOAL if (source, repeats) == ("cache", 3) else MORE)
        if name == s.pipeline_models[0]:
            rows.add("full pipeline", f"{name}, replay cache teacher, x3",
                     lambda b=base, n=name, k=key: _replay_row(s, device, b, n, teachers[k][0], shards_url, shards,
                                                               root / n / "replay"), priority=MORE)
        rows.add("peers", f"{name}, online teacher, timm+PIL",
                 lambda b=base, n=name, k=key: _peers(s, device, b, teachers[k][0], shards, n), priority=GOAL)
        if name == s.pipeline_models[0] and s.s3:
            store = _StoreCopy(root, shards)
            stack.callback(store.close)  # open until the suite ends
            for repeats in (3, 1):
                rows.add("full pipeline", f"{name}, cache teacher, x{repeats}, S3",
                         lambda b=base, n=name, k=key, r=repeats, w=store:
                         measure(b, n, *teachers[k], "cache", r, w.shard_set(), "S3 (moto on 127.0.0.1)"))
    return {name: (base, lambda k=key: teachers[k], shards) for name, (base, key) in built.items()}


def _pipeline_compiled(s: Settings, device: torch.device, built: dict[str, tuple], rows: _Rows) -> None:
    """The first pipeline model's full pipeline (cached teacher, x3) with the student torch.compile'd
    (``runtime.compile=true``): the trainer's fastest configuration, for the goal; and, last, its online
    x3 row with the teacher compiled (``distill.compile_teacher=true``)."""
    from trainer.overrides import apply_overrides

    if not built:
        return
    name = next(iter(built))
    base, teacher, shards = built[name]
    rows.add("full pipeline", f"{name}, cache teacher, x3, compiled",
             lambda: _pipeline_row(s, device, base, name, *teacher(), "cache", 3, shards, compile_model=True),
             min_seconds=COMPILE_SECONDS, priority=COMPILED)

    def online_compiled() -> GpuRow:  # distill.compile_teacher: what compiling buys the online teacher
        row = _pipeline_row(s, device, apply_overrides(base, ["distill.compile_teacher=true"]), name, *teacher(),
                            "online", 3, shards)
        return replace(row, name=f"{name}, online teacher compiled, x3",
                       note=row.note.replace("teacher ->", "compiled teacher ->"))

    rows.add("full pipeline", f"{name}, online teacher compiled, x3", online_compiled, min_seconds=COMPILE_SECONDS,
             priority=LAST)


PROFILED_STEPS = 5


def _profile(s: Settings, device: torch.device, built: dict[str, tuple], rows: _Rows, out: str | None) -> None:
    """Where the step's time goes, for the first pipeline model's full pipeline (cached teacher, x3):
    ``PROFILED_STEPS`` steps under torch.profiler after the warm-up; the row's note gives each phase's
    device time per step (the trainer's ``distillery.<phase>`` ranges) and the top kernels; ``out``: the
    profiler's whole table is written there."""
    from trainer.worker import PHASES

    if not built:
        return
    name = next(iter(built))
    base, teacher, shards = built[name]
    label = f"{name}, cache teacher, x3, profiled"

    def measure() -> GpuRow:
        p, loader = _pipeline_parts(s, device, base, *teacher(), "cache", 3, shards)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities)
        rate, wait, _ = _time(p, iter(loader), replace(s, steps=PROFILED_STEPS), during=prof)
        del p, loader
        _free(device)
        events = prof.key_averages()
        cuda = device.type == "cuda"

        def spent(event, own: bool = False) -> float:  # microseconds on the device (the CPU without a GPU)
            kind = "self_" if own else ""
            return float(getattr(event, f"{kind}{'device' if cuda else 'cpu'}_time_total"))

        host = torch.autograd.DeviceType.CPU
        ranges = [e for e in prof.events() if e.name.startswith("distillery.") and e.device_type == host]
        phases: dict[str, float] = {}
        for r in ranges:  # the host-side ranges (a GPU has device-side copies of them, not counted)
            phase = r.name.removeprefix("distillery.")
            phases[phase] = phases.get(phase, 0.0) + spent(r)
        if cuda:  # a backward's kernels come from autograd's device thread, outside the range's own tree
            threads = {r.thread for r in ranges}
            for e in prof.events():
                if e.device_type != host or e.cpu_parent is not None or e.thread in threads or not spent(e):
                    continue
                owner = next((r for r in ranges if r.time_range.start <= e.time_range.start <= r.time_range.end),
                             None)
                if owner is not None:
                    phase = owner.name.removeprefix("distillery.")
                    phases[phase] += spent(e)
        def leaf(event) -> bool:  # kernels on a GPU (an op's "self" device time repeats its kernels'); ops on a CPU
            if event.key.startswith("distillery."):
                return False
            return event.device_type == torch.autograd.DeviceType.CUDA if cuda else spent(event, own=True) > 0

        kernels = sorted((e for e in events if leaf(e)), key=lambda e: -spent(e, own=True))
        total = sum(spent(e, own=True) for e in kernels) or 1.0
        if out:
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            _write_atomic(out, f"{label} ({PROFILED_STEPS} steps)\n\n" + events.table(sort_by=sort, row_limit=40))
        per_step = ", ".join(f"{phase} {phases.get(phase, 0.0) / PROFILED_STEPS / 1e3:.1f}" for phase in PHASES)
        top = ", ".join(f"{e.key[:40]} {spent(e, own=True) / total:.0%}" for e in kernels[:3])
        where = "device" if cuda else "CPU (no GPU)"
        return GpuRow("profile", label, rate, wait, None, None,
                      f"{where} ms per step: {per_step}; top: {top}")

    rows.add("profile", label, measure, min_seconds=PROFILE_SECONDS, priority=LAST)


class _StoreCopy:
    """The local S3-protocol store (moto) holding a copy of ``shards``: started by the first row that reads
    it, inside that row's measurement, so a store that does not start fails the S3 rows and not the suite
    (the error is kept: the other S3 rows fail with it at once); :meth:`close` stops it."""

    def __init__(self, root: Path, shards) -> None:
        self.root, self.shards = root, shards
        self._store = None
        self._copy = None
        self._error: Exception | None = None

    def shard_set(self):
        """The shards' ShardSet in the store, which starts now if it has not yet."""
        if self._error is not None:
            raise RuntimeError(f"the local S3 store is not there: {type(self._error).__name__}: "
                               f"{self._error}") from self._error
        if self._copy is None:
            try:
                self._copy = self._start()
            except Exception as exc:
                self._error = exc
                raise
        return self._copy

    def _start(self):
        from infra.objectstore import start_object_store
        from pipeline.storage import Location
        from pipeline.stream import ShardSet

        self._store = start_object_store(self.root / "s3-state")
        fs, local = self.shards.location.fs_and_path()
        location = Location("s3://distillery/bench-shards", self._store.storage_options())
        s3, remote = location.fs_and_path()
        for path in fs.ls(local, detail=False):
            if fs.isfile(path):
                s3.put(path, f"{remote}/{path.rsplit('/', 1)[-1]}")
        return ShardSet.open(location, "train")

    def close(self) -> None:
        if self._store is not None:
            from infra.objectstore import stop_object_store

            stop_object_store(self._store)
            self._store = None


def _random_teacher(config: TrainConfig, shards_url: str, root: Path) -> tuple[str, str, float]:
    """Random teacher weights saved under ``root`` and a cache of that teacher over the shards (no Ray);
    returns (weights, cache, seconds the build took)."""
    from trainer.bench import _random_teacher_cache, random_teacher_weights

    root.mkdir(parents=True, exist_ok=True)
    weights = random_teacher_weights(config, root / "teacher-random.pth")
    started = time.perf_counter()
    cache = _random_teacher_cache(config, shards_url, weights, root / "cache", workers=0)
    seconds = time.perf_counter() - started
    log.info("bench_gpu: teacher cache of %s built in %.1f s", config.distill.teacher.name, seconds)
    return weights, cache, seconds


def _cache_build_rate(s: Settings, device: torch.device, config: TrainConfig, weights: str, shards_url: str,
                      out: Path, label: str) -> GpuRow:
    """The cache build's steady rate: one ``teacher-cache build`` worker (as ``--workers 0`` runs it) over
    every shard after a first one untimed (the teacher's and the DALI graph's start-up, cuDNN's choice of
    kernels), writing its parts under ``out``."""
    from pipeline.storage import Location
    from teacher_cache.build import CacheBuildConfig, CacheWorker
    from teacher_cache.teacher import TeacherSpec
    from trainer.worker import _sync

    t = config.distill.teacher
    cfg = CacheBuildConfig(shards=Location(shards_url), out=Location(str(out)), augment=config.data.augment,
                           teacher=TeacherSpec(t.name, weights, config.model.num_classes, t.img_size), workers=0)
    worker = CacheWorker(cfg, device.type)
    shards = sorted(worker.shards.shard_names)
    meta = {"fingerprint": worker.shards.fingerprint, "teacher": t.name, "resolution": t.img_size,
            "weights": weights, "k": cfg.topk}
    worker.run(shards[0], meta)  # warm-up
    timed = shards[1:] or shards  # one shard only: the same one again
    _sync(device)
    started = time.perf_counter()
    images = sum(worker.run(shard, meta)["samples"] for shard in timed)
    seconds = time.perf_counter() - started
    del worker
    _free(device)
    return GpuRow("teacher", f"{label} cache build", images / seconds,
                  note=f"one build worker, {len(timed)} shard{'s' if len(timed) > 1 else ''} after one of warm-up, "
                       f"batch {cfg.batch_size}: DALI "
                       f"decode -> bf16 logit maps -> top-k -> parquet")


def _teacher_inference(s: Settings, device: torch.device, config: TrainConfig, weights: str, label: str) -> GpuRow:
    """The teacher's plain forward alone (bf16 autocast and channels_last on a GPU, no gradients: issue 4's
    "bf16 inference rate"; the build runs the same network up to its feature map, then the head at every
    location and top-k) on random normalised images at the build's batch: the baseline of the build's rate."""
    from teacher_cache.build import CacheBuildConfig
    from teacher_cache.teacher import Teacher, TeacherSpec
    from trainer.worker import _sync

    t = config.distill.teacher
    teacher = Teacher(TeacherSpec(t.name, weights, config.model.num_classes, t.img_size), str(device))
    batch = CacheBuildConfig.batch_size
    x = torch.randn(batch, 3, t.img_size, t.img_size, device=device).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        teacher.logits(x)
    _sync(device)
    started, images = time.perf_counter(), 0
    while images < max(s.images, batch) or time.perf_counter() - started < 1.0:
        teacher.logits(x)
        images += batch
    _sync(device)
    rate = images / (time.perf_counter() - started)
    del teacher, x
    _free(device)
    return GpuRow("teacher", f"{label} bf16 inference alone", rate, note=f"forward only, batch {batch}, random input")



class _ShardBytes(torch.utils.data.Dataset):
    """The peers' dataset: each sample's JPEG bytes read from its shard file (as ImageFolder reads files),
    decoded with PIL and put through timm's transform in the DataLoader's worker processes."""

    def __init__(self, shards, transform):
        fs, root = shards.location.fs_and_path()
        self.paths = {i: f"{root}/{name}" for i, name in shards.shard_names.items()}
        self.shard, self.offset, self.size = shards.shards, shards.offsets, shards.sizes
        self.labels, self.transform = shards.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        with open(self.paths[int(self.shard[i])], "rb") as handle:
            handle.seek(int(self.offset[i]))
            data = handle.read(int(self.size[i]))
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB")), int(self.labels[i])


def _peers(s: Settings, device: torch.device, base: TrainConfig, weights: str, shards, name: str) -> GpuRow:
    """The DeiT reference code's way: timm transforms + PIL DataLoader, timm Mixup, online teacher."""
    from timm.data import Mixup, create_transform

    from pipeline.bench_stream import PeerTransform
    from trainer.overrides import apply_overrides
    from trainer.worker import build_teacher, local_parts, optimizer_step

    config = apply_overrides(base, ["distill.source=online", f"distill.teacher.pretrained_path={weights}",
                                    "data.stream.repeats=1"])
    a, m = config.data.augment, config.data.mix
    transform = PeerTransform(create_transform(a.image_size, is_training=True, auto_augment=a.auto_augment,
                                               interpolation=a.interpolation, re_prob=a.reprob, re_mode=a.remode,
                                               re_count=a.recount))
    loader = torch.utils.data.DataLoader(_ShardBytes(shards, transform), batch_size=config.data.batch_size,
                                         shuffle=True, num_workers=s.threads, drop_last=True, pin_memory=True,
                                         persistent_workers=True, prefetch_factor=2,  # /dev/shm
                                         multiprocessing_context="spawn")  # no fork after DALI's threads
    mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob,
                  label_smoothing=m.label_smoothing, num_classes=config.model.num_classes)
    teacher, _ = build_teacher(config, device, shards)
    p = local_parts(config, device, teacher)

    def batches() -> Iterator:
        while True:
            yield from loader

    def step(batch) -> None:
        x, y = batch
        x, targets = mixup(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        p.schedule.apply(p.optimizer, p.step)
        optimizer_step(p, x.contiguous(memory_format=torch.channels_last), targets)

    rate, wait, mem = _time(p, batches(), s, step)
    return GpuRow("peers", f"{name}, online teacher, timm+PIL", rate, wait, None, mem,
                  f"timm create_transform + PIL, DataLoader with {s.threads} worker processes, timm Mixup")


def _dali_alone(s: Settings, device: torch.device, shards_url: str, rows: _Rows) -> None:
    from pipeline.bench_stream import bench_dali
    from pipeline.storage import Location
    from pipeline.stream import ShardSet

    shards = ShardSet.open(Location(shards_url), "train")
    views = s.batch * (s.steps + s.warmup)
    dev = "cpu" if device.type == "cpu" else str(device)

    def measure(label: str, repeats: int, augment: bool, decode_crop: bool = True) -> GpuRow:
        rate, per_view = bench_dali(shards, s.batch, repeats, s.threads, views, dev, s.size, augment=augment,
                                    decode_crop=decode_crop)
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # bench_dali gives a CPU batch stage one thread
        return GpuRow("DALI alone", label, rate, note=f"{per_view / 1e3:.1f} KB of shards read per view")

    whole = "decode + RRC, the whole image decoded (the row above decodes the crop alone)"
    for label, repeats, augment, crop in (("decode + RRC", 1, False, True), (whole, 1, False, False),
                                          ("decode + RRC + batch augmentation", 1, True, True),
                                          ("decode once -> 3 RRC views", 3, False, True),
                                          ("decode once -> 3 views + batch augmentation", 3, True, True)):
        rows.add("DALI alone", label, lambda a=label, k=repeats, g=augment, c=crop: measure(a, k, g, c),
                 priority=DALI if crop else MORE)
    rows.add("DALI alone", "outputs on torch's stream (check)", lambda: _dali_output_order(s, device, shards),
             priority=DALI)
    for chunk in (None, 1 << 22, 1 << 30):  # the default chunk of images per kernel, 4x it, the whole batch
        label = f"RandAugment alone, chunk {'default' if chunk is None else f'{chunk >> 20} Mpx'}"
        rows.add("batch augmentation", label, lambda c=chunk, a=label: _rand_augment_alone(s, device, c, a),
                 priority=DALI if chunk is None else LAST)
    rows.add("batch augmentation", DALI_STOCK_RA, lambda: _dali_stock_rand_augment(s, device, DALI_STOCK_RA),
             priority=DALI)


def _queue_gpu_work(device: torch.device, seconds: float) -> float:
    """Queue about ``seconds`` of bf16 matrix products on torch's current stream and return at once (after
    one timed product that sizes the queue); the seconds queued. Off a GPU: none, 0."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    a @ a
    torch.cuda.synchronize(device)
    one = time.perf_counter() - started
    count = max(1, int(seconds / max(one, 1e-6)))
    for _ in range(count):
        a @ a
    return count * one


def _dali_output_order(s: Settings, device: torch.device, shards) -> GpuRow:
    """Checks `pipeline.dali_graph.run_graph` on this device: with a graph's outputs on torch's stream, copying
    a batch out (`to_torch`) queues behind the GPU work already on that stream instead of making the host wait
    for it, which DALI's host-synchronous outputs (``pipe.run()`` with no stream) do. Each way, one batch of
    whole images is taken from the graph, ~0.2 s of matrix products are queued, and the copy's host time is
    timed. Off a GPU nothing is queued and the two calls are the same."""
    from pipeline.config import StreamConfig
    from pipeline.dali_graph import device_id_of, run_graph, to_torch, whole_image_graph
    from pipeline.stream import SampleStream
    from trainer.worker import _sync

    samples = SampleStream(shards, StreamConfig(shuffle_buffer=16), threads=1).take(min(s.batch, len(shards)))
    encoded = [np.frombuffer(x.data, dtype=np.uint8) for x in samples]
    device_id = device_id_of(device)
    dev = "cpu" if device_id is None else str(device)
    pipe = whole_image_graph(lambda: encoded, len(encoded), s.size, device_id, s.threads)
    pipe.build()

    def host_wait(stream_ordered: bool) -> tuple[float, float]:
        out = (run_graph(pipe, device_id) if stream_ordered else pipe.run())[0]
        _sync(device)
        queued = _queue_gpu_work(device, 0.2)
        started = time.perf_counter()
        images = to_torch(out, dev)
        waited = time.perf_counter() - started
        _sync(device)
        if images.shape[0] != len(encoded):
            raise AssertionError(f"the copy holds {images.shape[0]} images, the graph made {len(encoded)}")
        return waited, queued

    host_wait(True)  # warm-up: allocations, the matrices' kernels
    old, _ = host_wait(False)
    new, queued = host_wait(True)
    note = (f"host time of a {len(encoded)}-image batch's copy out behind {queued * 1e3:.0f} ms of queued GPU work: "
            f"{new * 1e3:.1f} ms with outputs on torch's stream (run_graph), {old * 1e3:.1f} ms host-synchronous")
    if device.type == "cuda" and new > 0.5 * queued:
        raise AssertionError(f"stream-ordered outputs still made the host wait: {note}")
    return GpuRow("DALI alone", "outputs on torch's stream (check)", None, note=note)


def _random_views(s: Settings, device: torch.device) -> torch.Tensor:
    """A batch of random uint8 views, NHWC as DALI hands them over, kept on the device."""
    return torch.randint(0, 256, (s.batch, s.size, s.size, 3), dtype=torch.uint8, device=device)


def _rand_augment_alone(s: Settings, device: torch.device, chunk: int | None, label: str) -> GpuRow:
    """timm's rand-m9-mstd0.5-inc1 batched (`pipeline.randaugment`) on random uint8 views kept on the
    device, channels_last as DALI hands them over; ``chunk``: pixels per kernel call."""
    from pipeline.randaugment import RandAugment
    from trainer.worker import _sync

    views = _random_views(s, device).permute(0, 3, 1, 2)
    aug = RandAugment("rand-m9-mstd0.5-inc1", chunk_pixels=chunk)
    rng = np.random.default_rng(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, s.warmup)):
        aug(views, rng)
    _sync(device)
    started = time.perf_counter()
    for _ in range(s.steps):
        aug(views, rng)
    _sync(device)
    rate = s.batch * s.steps / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GpuRow("batch augmentation", label, rate, None, None, peak, f"{s.batch} views of {s.size} px per call")


def _dali_stock_rand_augment(s: Settings, device: torch.device, label: str) -> GpuRow:
    """DALI's own ``rand_augment`` on the same kind of views: the upper bound of any DALI ``auto_aug``
    build of timm's policy (`pipeline.dali_randaugment`)."""
    from pipeline.dali_randaugment import stock_rand_augment_rate

    views = _random_views(s, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # DALI reads the views on its own stream
        rate = stock_rand_augment_rate(views, device.index or 0, threads=s.threads, repeats=max(1, s.steps))
    else:
        rate = stock_rand_augment_rate(views.numpy(), None, threads=s.threads, repeats=max(1, s.steps))
    return GpuRow("batch augmentation", label, rate, None, None, None,
                  f"{s.batch} views of {s.size} px per run; other semantics (fixed magnitude, no p=0.5, DALI's op set)")


def _remote_send(s: Settings, device: torch.device, rows: _Rows) -> None:
    """``distill.source=remote``'s send path on this device, without Ray (none here): a step's batch of
    views (``s.batch`` at ``s.size`` px, bf16 on a GPU) copied to pinned host memory on a side stream and
    handed to a stand-in actor handle, which checks it against a plain copy. The rate is sends one after
    the other, as training makes one a step (so one pinned buffer serves them all); in training each
    send overlaps a step. The check runs on the warm-up's send and on one after the timed ones, outside
    the timing (it compares the whole batch on the host)."""
    from trainer.remote_teacher import RemoteTeacher

    def measure() -> GpuRow:
        arrived = {"intact": 0, "changed": 0, "pageable": 0, "sent": 0}
        checking = threading.Event()  # read on the sender thread
        checking.set()
        transport = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = torch.randn(s.batch, 3, s.size, s.size, device=device)
        expected = x.to(transport).cpu()

        class Standin:  # an actor handle's ``logits.remote``: checks what arrived and keeps none of it, as
            class logits:  # noqa: N801 - Ray's serialisation lets go of the pinned buffer for the next send
                @staticmethod
                def remote(host: torch.Tensor) -> int:
                    arrived["sent"] += 1
                    arrived["pageable"] += device.type == "cuda" and not host.is_pinned()
                    if checking.is_set():
                        arrived["intact" if torch.equal(host, expected) else "changed"] += 1
                    return arrived["sent"]

        remote = RemoteTeacher(Standin(), transport)
        try:
            remote._send(x).result()  # warm-up: the stream, the pinned allocator; checked
            checking.clear()
            started = time.perf_counter()
            for _ in range(s.steps):
                remote._send(x).result()
            seconds = time.perf_counter() - started
            checking.set()
            remote._send(x).result()  # after the timed sends: checked
        finally:
            remote.close()
        if arrived["changed"] or arrived["pageable"]:
            raise AssertionError(f"of the batches the stand-in actor received, {arrived['changed']} were changed "
                                 f"and {arrived['pageable']} not in pinned memory")
        return GpuRow("remote teacher", "send path, no Ray", s.steps * s.batch / seconds,
                      note=f"{s.batch} views of {s.size} px ({expected.element_size() * expected.numel() / 1e6:.0f} MB "
                           f"{str(transport).removeprefix('torch.')}) a send; {arrived['sent']} sent, the first and "
                           f"the last checked: {arrived['intact']} intact"
                           f"{', pinned' if device.type == 'cuda' else ''}")

    rows.add("remote teacher", "send path, no Ray", measure, priority=MORE)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the suite


def _title(s: Settings, name: str, origin: str) -> str:
    numerics = "bf16 autocast" if torch.cuda.is_available() else "fp32 (no GPU)"
    return (f"trainer.bench_gpu on {name}: batch {s.batch} views per step, {s.steps} steps timed after {s.warmup}, "
            f"{s.size} px, {numerics}; data: {origin}; "
            f"{s.threads} loader / DALI threads and peer workers; random weights"
            + (f"; overrides: {' '.join(s.overrides)}" if s.overrides else "")
            + f"; torch.compile scope {s.compile_scope}")


def run_suite(s: Settings, partial: str | None = None, profile: str | None = None) -> tuple[str, list[GpuRow]]:
    """The whole table. ``partial``: a file rewritten (atomically) with the table so far after every row,
    so that a run killed at the device's time limit still leaves what it measured; ``profile``: where the
    profile row writes the profiler's table."""
    from trainer.bench import synthetic_shards

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores), no GPU"
    peak = peak_flops(name) if cuda else None
    origin = "(data not generated yet)"

    def save(rows_so_far: list[GpuRow]) -> None:
        if partial:
            _write_atomic(partial, table(_title(s, name, origin) + " (partial: the run was still going)", rows_so_far))

    already = time.time() - s.started_at if s.started_at is not None else 0.0  # e.g. unpacking DALI
    rows = _Rows(time.monotonic() + s.max_seconds - max(already, 0.0), save)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        flops: dict[str, float] = {}
        classes = _recipe(s.pipeline_models[0], s).model.num_classes if s.pipeline_models else 1000
        shards_url, origin = synthetic_shards(root / "data", s.images, classes, s.size)
        # table order; rows.run() measures them by priority (FIRST ... LAST)
        _model_only(s, device, peak, rows, compiled=False, flops=flops)
        built = _pipeline(s, device, root, shards_url, rows, stack)
        _dali_alone(s, device, shards_url, rows)
        if s.compiled:
            _pipeline_compiled(s, device, built, rows)
        _model_only(s, device, peak, rows, compiled=True, flops=flops)  # compiling costs ~1 min a model
        _checkpoints(s, device, root, rows)
        _remote_send(s, device, rows)
        _profile(s, device, built, rows, profile)
        rows.run()
    return _title(s, name, origin), rows.rows


def table(title: str, rows: Sequence[GpuRow]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [title, "", "| section | row | views/s | data wait | MFU | peak GiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for r in rows:
        lines.append(f"| {r.section} | {r.name} | {fmt(r.views_per_s, ',.0f')} | {pct(r.data_wait)} | {pct(r.mfu)} | "
                     f"{fmt(r.peak_gib, '.1f')} | {r.note} |")
    lines += ["", *verdicts(rows)]
    return "\n".join(lines)


def verdicts(rows: Sequence[GpuRow]) -> list[str]:
    """Issue 8's goals, and ratios against baselines of the same run."""
    by_name = {r.name: r for r in rows if r.views_per_s}  # a failed or skipped row has no rate: no ratio
    out = ["| ratio or goal | value | target | verdict |", "| --- | ---: | ---: | --- |"]

    def line(what: str, value: float | None, target: float | None, higher: bool = True, spec: str = ".2f") -> None:
        if value is None:
            return
        verdict = "-" if target is None else ("met" if (value >= target if higher else value <= target) else "missed")
        goal = "-" if target is None else ("" if higher else "<= ") + format(target, spec)
        out.append(f"| {what} | {format(value, spec)} | {goal} | {verdict} |")

    for name, goal in GOALS.items():
        full = by_name.get(f"{name}, cache teacher, x3")
        model = by_name.get(name)
        peer = by_name.get(f"{name}, online teacher, timm+PIL")
        if full is None:
            continue
        line(f"{name}: full pipeline, cached teacher, img/s (issue 8 goal, one H100)", full.views_per_s, goal,
             spec=",.0f")
        line(f"{name}: its data wait", full.data_wait, MAX_DATA_WAIT, higher=False, spec=".1%")
        fast = by_name.get(f"{name}, cache teacher, x3, compiled")
        if fast is not None:
            line(f"{name}: full pipeline, cached teacher, compiled student, img/s (issue 8 goal)", fast.views_per_s,
                 goal, spec=",.0f")
            line(f"{name}: its data wait (compiled)", fast.data_wait, MAX_DATA_WAIT, higher=False, spec=".1%")
        if model is not None:
            line(f"{name}: full pipeline (cache, x3) / model only", full.views_per_s / model.views_per_s, 0.95)
        if peer is not None:
            line(f"{name}: full pipeline (cache, x3) / peers' stack", full.views_per_s / peer.views_per_s, None)
    for name in PIPELINE_MODELS:  # whether or not the cache rows ran
        online, online_compiled = by_name.get(f"{name}, online teacher, x3"), by_name.get(
            f"{name}, online teacher compiled, x3")
        if online is not None and online_compiled is not None:
            line(f"{name}: online teacher compiled / eager (x3)", online_compiled.views_per_s / online.views_per_s,
                 None)
    for build in (r for r in rows if r.section == "teacher" and r.name.endswith(" cache build") and r.views_per_s):
        alone = by_name.get(build.name.removesuffix(" cache build") + " bf16 inference alone")
        if alone is not None:
            line(f"{build.name} / its bf16 inference alone (issue 4)", build.views_per_s / alone.views_per_s, 0.90)
    for name in ("cait_xxs24", "cait_s24"):
        eager = by_name.get(name)
        for fast, what in ((f"{name} compiled", "compiled"),
                           (f"{name}{SDPA_TALKING_HEADS}", "sdpa talking heads, eager"),
                           (f"{name}{SDPA_TALKING_HEADS} compiled", "sdpa talking heads, compiled")):
            if eager is not None and fast in by_name:
                line(f"{name}: {what} / timm eager step", by_name[fast].views_per_s / eager.views_per_s, 2.0)
    per_block, whole = by_name.get("cait_xxs24 compiled"), by_name.get(f"cait_xxs24{WHOLE_MODEL} compiled")
    if per_block is not None and whole is not None:  # what compiling per block costs (or gains) the step
        line("cait_xxs24: compiled per block / whole model compiled (step rate)",
             per_block.views_per_s / whole.views_per_s, None)
    for name in {r.name.split(", ")[0] for r in rows if r.section == "checkpoints"}:
        model = by_name.get(name)
        for background, label in GPU_CHECKPOINT_LABELS.items():
            row = by_name.get(f"{name}, {label}")
            if model is not None and row is not None:
                line(f"{name}: {label} / none{' (checkpoint.background, the default)' if background else ''}",
                     row.views_per_s / model.views_per_s, None, spec=".3f")
    ours, stock = by_name.get("RandAugment alone, chunk default"), by_name.get(DALI_STOCK_RA)
    if ours is not None and stock is not None:
        line("RandAugment: ours (timm's semantics) / DALI stock rand_augment", ours.views_per_s / stock.views_per_s,
             None)
    return out


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)


def write(path: str, text: str, device: str) -> None:
    """Append the table to ``path`` (BENCHMARKS.md) under a heading with the date and the device."""
    today = datetime.date.today().isoformat()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"\n## `python -m trainer.bench_gpu` ({today}, {device})\n\n{text}\n")


def _have_s3() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("s3fs", "moto"))
    except ImportError:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every recipe")
    p.add_argument("--batch", type=int, default=252,
                   help="views per step, a multiple of 6 (even at repeats 3 and 1; default 252)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--images", type=int, default=3072, help="generated JPEGs for the pipeline rows")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--pipeline-models", default=",".join(PIPELINE_MODELS))
    p.add_argument("--teacher", help="timm model in place of the recipes' teacher (default: the recipe's)")
    p.add_argument("--compile", default="deit_s,cait_xxs24,cait_s24", metavar="MODELS",
                   help="models whose model-only step is also timed torch.compile'd ('' for none; ~1 min each)")
    p.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="auto",
                   help="runtime.compile_scope of the compiled rows (default auto: per block where the blocks are "
                        "alike, CaiT's, a fraction of the whole model's compile, which a lent GPU's minutes cannot "
                        "spare; DeiT's whole)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--write", metavar="PATH", help="append the table to this file (BENCHMARKS.md)")
    p.add_argument("--max-seconds", type=float, default=480.0,
                   help="start no row after this many seconds (default 480: a lent GPU's minutes are few)")
    p.add_argument("--started-at", type=float, metavar="UNIX_SECONDS",
                   help="count --max-seconds from this time (scripts/gpu_bench.sh: its own start, so that "
                        "installing DALI counts too), not from this process's start")
    p.add_argument("--quick", action="store_true", help="CI size: checks that every row runs, not its speed")
    p.add_argument("--s3", action=argparse.BooleanOptionalAction, default=None,
                   help="rows through the local S3-protocol store (default: when s3fs and moto are importable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = _parser().parse_args(argv)
    s = Settings(batch=args.batch, steps=args.steps, warmup=args.warmup, images=args.images, size=args.size,
                 teacher=args.teacher, models=tuple(m for m in args.models.split(",") if m),
                 pipeline_models=tuple(m for m in args.pipeline_models.split(",") if m),
                 compiled=tuple(m for m in args.compile.split(",") if m),
                 threads=args.threads, overrides=tuple(args.overrides), max_seconds=args.max_seconds,
                 started_at=args.started_at,
                 compile_scope=args.compile_scope,
                 s3=args.s3 if args.s3 is not None else _have_s3())
    if args.quick:
        s = replace(s, batch=6, steps=2, warmup=1, images=24, size=32, teacher=s.teacher or "resnet10t",
                    threads=min(s.threads, 2), compiled=())
    if s.batch % 6:
        raise SystemExit(f"--batch {s.batch}: must be a multiple of 6, so that the views of a step are even "
                         f"(Mixup/CutMix pairs them) at repeats 3 and 1; e.g. --batch {s.batch // 6 * 6 or 6}")
    title, rows = run_suite(s, partial=f"{args.write}.partial" if args.write else None,
                            profile=f"{args.write}.profile.txt" if args.write else None)
    text = table(title, rows)
    print(text)
    if args.write:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU, no GPU"
        write(args.write, text, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
