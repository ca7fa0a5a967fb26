"""The training loop of one Ray Train worker (one per GPU; gloo on CPU in tests and the demo).

    restore (ray.train.get_checkpoint(), else RunOptions.resume)
    -> build: model (DDP via ray.train.torch.prepare_model), optimizer + schedule + EMA, teacher,
       train loader for this rank, batch augmentation, eval loader, tracker (rank 0)
    -> for each step: train_step, maybe log, maybe eval + checkpoint (epoch end), maybe checkpoint

A checkpoint is reported with ``ray.train.report(metrics, checkpoint=...)`` from rank 0 (the others
report the metrics alone; the call is a barrier), every ``checkpoint.every_n_steps`` steps and at each
epoch end, where the model is evaluated first. The write and the report run on a background thread
while training goes on (``checkpoint.background``; trainer.background). A checkpoint holds every rank's
loader state and RNG states, so a restarted worker group (Ray Train restarts all workers after a
failure, up to ``FailureConfig.max_failures`` times, and hands them the latest registered checkpoint)
trains on exactly the samples, crops and batch-level draws the uninterrupted run would have. Steps
between that checkpoint and the failure are trained again.

One epoch is N views of the N-image train split (``TrainLoader.steps_per_epoch``), as DeiT counts
epochs under repeated augmentation. The teacher (online) sees the same mixed batch as the student,
as in DeiT; its outputs never get a gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.batch_aug import BatchAugment, MixParams, normalize
from pipeline.loader import Batch, EvalLoader, TrainLoader, effective_batch, state_for_world
from pipeline.storage import Location
from pipeline.stream import ShardSet
from pipeline.views import batch_rng
from teacher_cache.cache import TeacherCache
from teacher_cache.maps import mixed
from teacher_cache.teacher import Fp32Head, TeacherSpec, expected_identity, ready_for_inference
from trainer.background import Background, snapshot
from trainer.checkpoint import (
    CheckpointError,
    CorruptCheckpoint,
    TrainState,
    capture_rng,
    checkpoint_step,
    checkpoints_newest_first,
    load_checkpoint,
    load_newest_intact,
    load_pretrained,
    resolve_checkpoint,
    restore_rng,
    safe_config,
    save_checkpoint,
)
from trainer.config import ConfigError, TrainConfig
from trainer.losses import DistillLossConfig, LossTerms, distillation_loss, fuse_heads, topk_accuracy
from trainer.optim import LRSchedule, build_ema, build_optimizer, build_schedule, clip_gradients, unwrap
from trainer.overrides import apply_overrides, flatten
from trainer.real_labels import RealLabels, load_real_labels
from trainer.remote_teacher import Prepared, RemoteTeacher, lookahead
from trainer.tracking import NullTracker, Tracker, TrackingSpec

log = logging.getLogger(__name__)

__all__ = ["RunOptions", "Parts", "encode", "decode", "train_loop_per_worker", "build", "local_parts", "build_teacher",
           "loss_config", "synthetic_batches", "train_step", "optimizer_step", "evaluate", "evaluate_model",
           "autocast_for", "checkpoint", "train_state"]

LOADER_METRICS = ("corrupt_samples", "substituted", "read_retries", "unreadable_pieces", "failed_windows")


@dataclass(frozen=True)
class RunOptions:
    """Facts and switches of one run that are not part of the recipe, passed to every worker.

    ``fault`` and ``key_log_dir`` exist for tests and debugging: ``fault={"rank": 1, "step": 7,
    "marker": PATH}`` makes that rank exit hard after that step once (the marker file remembers it), and
    ``key_log_dir`` gets one JSON line per step and rank with the sample keys trained on.

    ``bench={"warmup": W, "steps": N, "data": "loader" | "synthetic", "teacher": bool, "checkpoint_every": K}``
    is ``trainer.bench``'s: run W + N steps (whatever the schedule's length) with no evaluation and no
    checkpoint unless ``checkpoint_every`` asks, and put the timing of the last N, summed over ranks, in the
    summary (``timing["bench"]``).
    ``data="synthetic"`` trains on one random batch of this rank's shape kept on the device instead of the
    loader's; ``teacher=False`` swaps the teacher for constant logits (the same loss, no teacher forward);
    ``checkpoint_every=K`` (default 0: none) writes a checkpoint every K measured steps and counts its cost
    on the training thread as step time.
    """

    name: str = "run"
    run_dir: str | None = None  # the run's storage folder (storage_path/name): tracking.json lives there
    tracking_uri: str = ""  # "": no tracking
    resume: str | None = None  # checkpoint (or folder of checkpoints) to start from when Ray has none
    code_version: str = ""
    ray_job_id: str = ""
    loader_threads: int = 4
    dali_threads: int = 2
    log_model: bool = True  # the final model (mlflow.pytorch.log_model) and checkpoint to MLflow
    key_log_dir: str | None = None
    fault: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None


def encode(config: TrainConfig, options: RunOptions) -> dict[str, Any]:
    """``train_loop_config`` for Ray: the flattened config (override syntax) and the options, JSON-able."""
    return {"config": flatten(config), "options": dataclasses.asdict(options)}


def decode(config_dict: dict[str, Any]) -> tuple[TrainConfig, RunOptions]:
    """Inverse of :func:`encode`."""
    config = apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in config_dict["config"].items()])
    return config, RunOptions(**config_dict.get("options", {}))


def loss_config(config: TrainConfig) -> DistillLossConfig:
    """``trainer.losses`` settings of a run (label smoothing is the Mixup stage's, DeiT's 0.1)."""
    d = config.distill
    return DistillLossConfig(kind=d.kind, tau=d.tau, alpha=d.alpha, label_smoothing=config.data.mix.label_smoothing,
                             base=config.loss.base, bce_target_threshold=config.loss.bce_target_threshold)


@dataclass
class Parts:
    """Everything the loop uses, built once per worker (start or restart)."""

    config: TrainConfig
    options: RunOptions
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped (and compiled) when so configured; unwrap() gives the bare model
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    ema: Any | None
    teacher: TeacherFn | None
    augment: BatchAugment
    loader: TrainLoader
    eval_loader: EvalLoader
    loss: DistillLossConfig
    tracker: NullTracker
    fingerprint: str
    step: int = 0
    restored_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    real_labels: RealLabels | None = None  # ReaL labels of the val split (data.real_labels)
    v2_loader: EvalLoader | None = None  # ImageNet-V2 (data.v2_url)
    writer: Background = field(default_factory=lambda: Background("distillery-checkpoint"))  # checkpoint()

    @property
    def autocast(self) -> torch.autocast:
        return autocast_for(self.config, self.device)


def autocast_for(config: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on GPU when ``runtime.bf16`` (fp32 on CPU: CPU bf16 is slow and not what runs)."""
    enabled = device.type == "cuda" and config.runtime.bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------- the loop


def train_loop_per_worker(config_dict: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's entry point on every worker; returns a summary on rank 0 (``Result.return_value``)."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    config, options = decode(config_dict)
    ctx = ray.train.get_context()
    p = build(config, options, ctx.get_world_rank(), ctx.get_world_size())
    p.timing["build_s"] = time.time() - started
    batches = _batches(p)
    if isinstance(p.teacher, RemoteTeacher):  # batch i+1 goes to the teacher actors before step i runs
        batches = lookahead(batches, p.augment, p.teacher)
    timer = _Timer()
    last = p.options.bench["warmup"] + p.options.bench["steps"] if p.options.bench else p.schedule.total_steps
    try:
        _train_steps(p, batches, timer, last)
    finally:
        if isinstance(p.teacher, RemoteTeacher):  # the look-ahead batch past the last step is not needed, and
            p.teacher.close()  # after a failure no queued send may outlive Ray's workers
    waited = p.writer.wait()  # the last checkpoint's write and report
    if p.options.bench:  # a benchmark charges that wait to its steps
        _add(p.timing, "checkpoint_wait_s", waited)
        _add(p.timing, "checkpoint_stall_s", waited)
        p.timing["bench"] = _bench_timing(p, timer)
    p.timing["loop_s"] = time.time() - started - p.timing["build_s"]
    return _finish(p)


def _train_steps(p: Parts, batches: Iterator, timer: _Timer, last: int) -> None:
    """Steps until ``last``, with logging, evaluation and checkpoints when due."""
    while p.step < last:
        batch = timer.wait(batches)
        terms = train_step(p, batch)
        p.step += 1
        timer.stepped(len(batch.keys))
        _after_step(p, batch, timer)
        if p.step % p.config.tracking.log_every_n_steps == 0:
            _log(p, terms, timer.take())
        evaluate_now, checkpoint_now = _due(p)
        if evaluate_now:
            p.last_eval = evaluate(p)
            p.tracker.log_metrics(p.last_eval, p.step)
        if checkpoint_now:
            checkpoint(p, {**p.last_eval} if evaluate_now else {})
            if not p.options.bench:  # a benchmark's checkpoints (bench["checkpoint_every"]) count as step time
                timer.restart()  # img/s and the data-wait fraction measure training, not eval and checkpoints


def _due(p: Parts) -> tuple[bool, bool]:
    """(evaluate, checkpoint) after this step: both at each epoch end, a checkpoint also every n steps;
    in a benchmark, no evaluation, and a checkpoint every ``bench["checkpoint_every"]`` measured steps
    (none after the last: the run ends there) if that is set."""
    if p.options.bench:
        every, measured = p.options.bench.get("checkpoint_every", 0), p.step - p.options.bench["warmup"]
        last = p.options.bench["steps"]
        return False, bool(every) and 0 < measured < last and measured % every == 0
    epoch_end = p.step % p.loader.steps_per_epoch == 0
    return epoch_end, epoch_end or p.step % p.config.checkpoint.every_n_steps == 0


class _Timer:
    """Step time and the part of it spent waiting for the next batch, summed over a logging interval
    (``take``) and since ``measure`` (``measured``: the steps a benchmark times)."""

    def __init__(self) -> None:
        self.wait_s = self.total_s = 0.0
        self.views = 0
        self.measured = {"steps": 0, "views": 0, "step_s": 0.0, "wait_s": 0.0}
        self._mark = time.perf_counter()

    def wait(self, batches: Iterator[Batch]) -> Batch:
        start = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - start
        self.wait_s += waited
        self.measured["wait_s"] += waited
        return batch

    def stepped(self, views: int) -> None:
        now = time.perf_counter()
        self.total_s += now - self._mark
        self.measured["step_s"] += now - self._mark
        self._mark = now
        self.views += views
        self.measured["views"] += views
        self.measured["steps"] += 1

    def restart(self) -> None:
        self._mark = time.perf_counter()

    def measure(self, device: torch.device) -> None:
        """Start ``measured`` afresh from here, once the device has run what is queued."""
        _sync(device)
        self.measured = {"steps": 0, "views": 0, "step_s": 0.0, "wait_s": 0.0}
        self.restart()

    def settle(self, device: torch.device) -> None:
        """Wait for the device's queued work (the last steps' kernels) and charge it to ``measured``."""
        _sync(device)
        now = time.perf_counter()
        self.measured["step_s"] += now - self._mark
        self._mark = now

    def take(self) -> dict[str, float]:
        out = {"step_s": self.total_s, "wait_s": self.wait_s, "views": float(self.views)}
        self.wait_s = self.total_s = 0.0
        self.views = 0
        return out


def train_step(p: Parts, batch: Batch | Prepared) -> LossTerms:
    """One optimizer step on ``batch``: augment (unless a look-ahead did), teacher, student, loss, backward,
    clip, update, EMA."""
    p.schedule.apply(p.optimizer, p.step)
    if isinstance(batch, Prepared):
        aug, batch = batch.aug, batch.batch
    else:
        with _phase("augment"):
            aug = p.augment.apply(batch.views, batch.labels, batch.rng)
    return optimizer_step(p, aug.x, aug.targets, batch, aug.mix)


PHASES = ("augment", "teacher", "student", "optimizer")  # a step's profiler ranges, "distillery.<phase>"


def _phase(name: str) -> torch.profiler.record_function:
    """A profiler range around one phase of the step (trainer.bench_gpu's profile reads them; outside a
    profiler it costs a few microseconds)."""
    return torch.profiler.record_function(f"distillery.{name}")


def optimizer_step(p: Parts, x: torch.Tensor, targets: torch.Tensor, batch: Batch | None = None,
                   mix: MixParams | None = None) -> LossTerms:
    """The step on an augmented batch (``x`` normalised and mixed, ``targets`` soft): teacher, student,
    loss, backward, clip, update, EMA. ``batch`` and ``mix`` are what a teacher cache needs (an online
    teacher only looks at ``x``)."""
    spans = _micro_batches(len(x), p.config.optim.micro_batches)
    with p.autocast, _phase("teacher"):
        teacher_logits = None
        if p.teacher is not None:
            with torch.no_grad():
                if isinstance(p.teacher, OnlineTeacher) and len(spans) > 1:  # per view: in pieces, as the student
                    teacher_logits = torch.cat([p.teacher(x[a:b], batch, mix) for a, b in spans])
                else:  # a cache pools and mixes over the whole batch
                    teacher_logits = p.teacher(x, batch, mix)
    p.optimizer.zero_grad(set_to_none=True)
    with _phase("student"):
        terms = _accumulate(p, x, targets, teacher_logits, spans)  # one slice (the whole batch) by default
    with _phase("optimizer"):
        clip_gradients(p.model, p.config.optim.clip_grad)
        p.optimizer.step()
        if p.ema is not None:
            p.ema.update(unwrap(p.model))
    return terms


def _micro_batches(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal slices of a batch of ``n`` views (fewer when n < parts)."""
    edges = np.linspace(0, n, min(max(parts, 1), n) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _accumulate(p: Parts, x: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                spans: list[tuple[int, int]]) -> LossTerms:
    """Forward and backward slice by slice, each loss weighted by its share of the batch, so the summed
    gradient is the whole batch's (the losses are per-view means; one slice: share 1.0, exactly the plain
    step); DDP all-reduces on the last slice only. Returns the whole batch's loss terms (detached, for
    logging)."""
    n = len(x)
    model = getattr(p.model, "_orig_mod", p.model)  # a compiled DDP module syncs through the DDP inside
    totals = torch.zeros(3, device=x.device)
    for i, (a, b) in enumerate(spans):
        quiet = model.no_sync() if hasattr(model, "no_sync") and i < len(spans) - 1 else contextlib.nullcontext()
        with quiet:
            with p.autocast:
                out = p.model(x[a:b])
            part = distillation_loss(out, targets[a:b], None if teacher_logits is None else teacher_logits[a:b],
                                     p.loss)
            share = (b - a) / n
            (part.total * share).backward()
        totals += torch.stack([part.total.detach(), part.base.detach(), part.distill.detach()]).float() * share
    return LossTerms(totals[0], totals[1], totals[2])


@torch.no_grad()
def evaluate(p: Parts) -> dict[str, float]:
    """Top-1 / top-5 on the val split (``eval/``, with ReaL labels when given: ``eval/real_top1``) and on
    ImageNet-V2 when given (``eval_v2/``), summed over ranks: class head, and for distilled models the
    distillation head and DeiT's fused classifier (softmax sum of both heads)."""
    model = unwrap(p.model)  # the bare model: a whole-model compile wraps it, per-block compiles sit inside it
    out = evaluate_model(model, p.eval_loader, p.config, p.device, "eval", p.real_labels)
    if p.v2_loader is not None:
        out.update(evaluate_model(model, p.v2_loader, p.config, p.device, "eval_v2"))
    return out


def _eager_once_compiled(fn):
    """``fn`` under torch's force_eager stance once torch.compile has run in this process (its compiled code
    would otherwise serve, or recompile for, evaluation's shapes). A process that never compiled has no
    compiled code and skips the stance: importing torch._dynamo for it alone costs ~1.7 s of CPU, paid by
    every Ray worker and CLI that imports this module."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return fn(*args, **kwargs)

    return wrapper


@torch.no_grad()
@_eager_once_compiled
def evaluate_model(model: torch.nn.Module, loader: EvalLoader, config: TrainConfig, device: torch.device,
                   prefix: str = "eval", real: RealLabels | None = None) -> dict[str, float]:
    """One pass of ``loader`` through the bare ``model`` in eval mode (eager, under the run's autocast):
    ``{prefix}/top1``, ``/top5`` (and ``/real_top1``, ``/real_top5`` with ``real``) per head, summed over
    ranks, and ``{prefix}/samples``. What the trainer logs and ``python -m trainer.evaluate`` prints."""
    was_training = model.training
    model.eval()
    distilled = config.model.distilled
    heads = ("cls", "dist", "fused") if distilled else ("cls",)
    # per head: top-1, top-5, ReaL top-1, ReaL top-5; then the sample count and the ReaL-labelled count
    sums = torch.zeros(len(heads) * 4 + 2, dtype=torch.float64)
    for images, labels, keys in loader:
        x = normalize(images, config.data.augment).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        with autocast_for(config, device):
            if distilled:
                tokens = model.forward_features(x)
                cls_logits, dist_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
                outputs = [cls_logits, dist_logits, fuse_heads(cls_logits, dist_logits)]
            else:
                outputs = [model(x)]
        n = labels.shape[0]
        for i, logits in enumerate(outputs):
            acc = topk_accuracy(logits.float(), labels, (1, 5))
            sums[4 * i] += acc[1] * n / 100.0
            sums[4 * i + 1] += acc[5] * n / 100.0
            if real is not None:
                (hit1, hit5), counted = real.hits(logits.float(), keys)
                sums[4 * i + 2] += hit1
                sums[4 * i + 3] += hit5
                if i == 0:
                    sums[-1] += counted
        sums[-2] += n
    model.train(was_training)
    sums = _all_reduce_sum(sums)
    count, labelled = max(float(sums[-2]), 1.0), max(float(sums[-1]), 1.0)
    names = {"cls": f"{prefix}/", "dist": f"{prefix}/dist_", "fused": f"{prefix}/fused_"}
    out = {f"{prefix}/samples": float(sums[-2])}
    for i, head in enumerate(heads):
        out[f"{names[head]}top1"] = float(sums[4 * i]) * 100.0 / count
        out[f"{names[head]}top5"] = float(sums[4 * i + 1]) * 100.0 / count
        if real is not None:
            out[f"{names[head]}real_top1"] = float(sums[4 * i + 2]) * 100.0 / labelled
            out[f"{names[head]}real_top5"] = float(sums[4 * i + 3]) * 100.0 / labelled
    if real is not None:
        out[f"{prefix}/real_samples"] = float(sums[-1])
    return out


def checkpoint(p: Parts, metrics: dict[str, float]) -> None:
    """Gather every rank's loader and RNG state; rank 0 writes the checkpoint and reports it to Ray.

    With ``checkpoint.background`` (the default) the training thread only gathers the states and copies
    rank 0's model, optimizer and EMA to host memory; the write and Ray's report (every rank's: it is a
    barrier) run on ``p.writer``'s thread while training goes on (trainer.background)."""
    started = time.perf_counter()
    _add(p.timing, "checkpoint_wait_s", p.writer.wait())  # the one before: one snapshot at a time; its error here
    mine = {"loader": p.loader.state_dict(), "rng": capture_rng()}
    every = _all_gather(mine, p.world)
    metrics = {**metrics, "step": p.step, "epoch": p.step / p.loader.steps_per_epoch}
    background = p.config.checkpoint.background
    state = train_state(p, every, copy=background) if p.rank == 0 else None
    job = functools.partial(_report, p, metrics, state)
    if background:
        p.writer.submit(job)
    else:
        job()
    _add(p.timing, "checkpoint_stall_s", time.perf_counter() - started)
    _add(p.timing, "checkpoints", 1)


def _add(timing: dict[str, float], key: str, value: float) -> None:
    timing[key] = timing.get(key, 0) + value


def train_state(p: Parts, every: list[dict[str, Any]], copy: bool) -> TrainState:
    """Rank 0's checkpoint of this step, with every rank's ``{"loader": ..., "rng": ...}`` (rank order).
    ``copy``: model, optimizer and EMA tensors copied to host memory (for a write that runs while the
    next steps change them in place); else the live tensors, for a write done before training goes on."""
    bare = unwrap(p.model)
    state = TrainState(
        step=p.step, epoch=p.step // p.schedule.steps_per_epoch, model=bare.state_dict(),
        optimizer=p.optimizer.state_dict(), ema=p.ema.module.state_dict() if p.ema is not None else None,
        loader={str(r): s["loader"] for r, s in enumerate(every)}, rng={str(r): s["rng"] for r, s in enumerate(every)},
        schedule=p.schedule.state_dict(), config=flatten(p.config), fingerprint=p.fingerprint,
        extra={"mlflow_run_id": p.tracker.run_id, "name": p.options.name, "world": p.world,
               "eval": {k: float(v) for k, v in p.last_eval.items()}},  # a finished run resumed still reports it
    )
    if copy:
        state = dataclasses.replace(state, model=snapshot(state.model), optimizer=snapshot(state.optimizer),
                                    ema=snapshot(state.ema))
    return state


def _report(p: Parts, metrics: dict[str, float], state: TrainState | None) -> None:
    """Ray's report of a checkpoint step (a barrier of all ranks): rank 0 writes ``state`` to a staging
    folder, reports it, and waits until Ray has registered it, so that a failure from then on restarts
    from it and not from the one before."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distillery-ckpt-") as staging:
        path = save_checkpoint(state, staging)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_dir_name=path.name)
    try:  # Ray registers a reported checkpoint when its controller next polls the workers
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=300)
    except Exception as exc:  # the wait is a guarantee about restarts, not a condition for training on
        log.warning("step %d: could not confirm that Ray registered the checkpoint (%s)", state.step, exc)
    _add(p.timing, "checkpoint_write_s", time.perf_counter() - started)
    log.info("step %d: checkpoint %s reported", state.step, path.name)


def _log(p: Parts, terms: LossTerms, timing: dict[str, float]) -> None:
    """Average the loss terms and sum the loader counters over ranks (one small all-reduce), log on rank 0."""
    loader = p.loader.metrics.as_dict()
    loss = terms.detached()  # one device sync
    values = torch.tensor([loss["loss"], loss["loss_base"], loss["loss_distill"], timing["views"],
                           *[float(loader.get(k, 0)) for k in LOADER_METRICS]], dtype=torch.float64)
    values = _all_reduce_sum(values)
    world = float(p.world)
    metrics = {
        "loss": float(values[0]) / world, "loss_base": float(values[1]) / world,
        "loss_distill": float(values[2]) / world, "lr": p.schedule.at(p.step - 1),
        "img_per_s": float(values[3]) / max(timing["step_s"], 1e-9),
        "data_wait_frac": timing["wait_s"] / max(timing["step_s"], 1e-9),
        "epoch": p.step / p.loader.steps_per_epoch,
        **{f"loader/{k}": float(v) for k, v in zip(LOADER_METRICS, values[4:].tolist(), strict=True)},
    }
    if isinstance(p.teacher, CachedTeacher):  # this rank's (the tracker logs rank 0's): climbing every step = thrashing
        metrics["teacher_cache/parts_read"] = float(p.teacher.cache.parts_read)
    if p.device.type == "cuda":  # rank 0's GPU: what is held now, and the high-water mark of the interval
        metrics["gpu_mem_gib"] = torch.cuda.memory_allocated(p.device) / 2**30
        metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(p.device) / 2**30
        torch.cuda.reset_peak_memory_stats(p.device)
    p.history.append({"step": float(p.step), **metrics})
    p.tracker.log_metrics(metrics, p.step)
    if p.rank == 0:
        log.info("step %d/%d loss %.4f lr %.3g %.0f img/s wait %.0f%%", p.step, p.schedule.total_steps,
                 metrics["loss"], metrics["lr"], metrics["img_per_s"], 100 * metrics["data_wait_frac"])


def _after_step(p: Parts, batch: Batch, timer: _Timer) -> None:
    """Debugging / test / benchmark hooks: the key log, the one-time fault and the end of a benchmark's
    warm-up (see RunOptions)."""
    if p.options.bench and p.step == p.options.bench["warmup"]:
        timer.measure(p.device)
    if p.options.key_log_dir:
        line = json.dumps({"step": batch.step, "keys": list(batch.keys), "pid": os.getpid()})
        with open(Path(p.options.key_log_dir) / f"keys-rank{p.rank}.jsonl", "a") as handle:
            handle.write(line + "\n")
    fault = p.options.fault
    if fault and fault.get("rank") == p.rank and fault.get("step") == p.step:
        marker = Path(fault["marker"])
        if not marker.exists():
            marker.write_text(f"rank {p.rank} exited at step {p.step}\n")
            log.warning("fault hook: rank %d exits at step %d", p.rank, p.step)
            os._exit(1)


def _batches(p: Parts) -> Iterator[Batch]:
    """The loader's batches; in a benchmark (``RunOptions.bench``) maybe synthetic ones, and maybe constant
    teacher logits in place of the teacher."""
    bench = p.options.bench or {}
    g = torch.Generator().manual_seed(p.config.runtime.seed + p.rank)
    views = p.loader.images_per_step * p.loader.repeats
    if p.teacher is not None and not bench.get("teacher", True):
        p.teacher = _ConstantTeacher(torch.randn(views, p.config.model.num_classes, generator=g).to(p.device))
    return _synthetic_batches(p, g) if bench.get("data") == "synthetic" else iter(p.loader)


def _synthetic_batches(p: Parts, g: torch.Generator) -> Iterator[Batch]:
    return synthetic_batches(p.config, p.device, p.loader.images_per_step, g, p.step, p.rank, len(p.loader.shards))


def synthetic_batches(config: TrainConfig, device: torch.device, images_per_step: int, g: torch.Generator,
                      start_step: int = 0, rank: int = 0, num_rows: int | None = None) -> Iterator[Batch]:
    """One random batch of a rank's shape (uint8 views laid out as the loader's, on ``device``), handed
    out at every step with that step's batch rng: the step without the loader. ``num_rows``: manifest
    rows the batch names (a teacher cache is looked up by them)."""
    n, k, size = images_per_step, config.data.stream.repeats, config.data.augment.image_size
    views = torch.randint(0, 256, (n * k, size, size, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    views = views.to(device)  # NCHW view of NHWC memory, as the loader's
    labels = torch.randint(0, config.model.num_classes, (n,), generator=g).repeat_interleave(k).to(device)
    rows = np.repeat(np.arange(n) % (num_rows or n), k)
    keys = [f"synthetic-{r}" for r in rows]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n * k, 1)
    flips = torch.zeros(n * k, dtype=torch.int32)
    view_ids = np.tile(np.arange(k), n) if config.data.augment.replay_views else None  # a replay cache's crops
    seed = config.data.stream.seed
    for step in itertools.count(start_step):
        yield Batch(views, labels, keys, boxes, flips, step, batch_rng(seed, rank, step), rows, view_ids)


def _bench_timing(p: Parts, timer: _Timer) -> dict[str, float]:
    """The measured steps of a benchmark: views, step and data-wait seconds summed over ranks (one all-reduce)."""
    timer.settle(p.device)
    m = timer.measured
    sums = _all_reduce_sum(torch.tensor([m["views"], m["step_s"], m["wait_s"]], dtype=torch.float64))
    return {"workers": float(p.world), "steps": float(m["steps"]), "views": float(sums[0]), "step_s": float(sums[1]),
            "wait_s": float(sums[2])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOSE_WITH_CHECKPOINT_S = 900.0  # the tracker's close when it also uploads the final checkpoint (~1 GB for DeiT-B)


def _finish(p: Parts) -> dict[str, Any] | None:
    close_s = 60.0
    if p.options.log_model and p.rank == 0 and p.restored_from != p.step:
        import copy

        p.tracker.log_model(copy.deepcopy(unwrap(p.model)).cpu().eval())
        final = resolve_checkpoint(p.options.run_dir) if p.options.run_dir else None
        if final is not None and checkpoint_step(final) == p.step:  # written and committed before the loop ended
            p.tracker.log_checkpoint(final)
            close_s = CLOSE_WITH_CHECKPOINT_S
    p.tracker.close(timeout=close_s)
    if p.rank != 0:
        return None
    return {"step": p.step, "history": p.history, "eval": p.last_eval, "restored_from": p.restored_from,
            "mlflow_run_id": p.tracker.run_id, "fingerprint": p.fingerprint, "timing": p.timing}


# ---------------------------------------------------------------------------------------------- building


def build(config: TrainConfig, options: RunOptions, rank: int, world: int) -> Parts:
    """Restore, then build every part for this rank (the model on this worker's device, DDP-wrapped)."""
    import ray.train.torch

    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    train_shards = ShardSet.open(Location(config.data.train_url), "train")
    val_shards = ShardSet.open(Location(config.data.val_url), "val")
    restored = _restore(options, train_shards.fingerprint)
    resized = restored is not None and _check_restored(restored, config, rank, world)
    bare = _student(config, restored.model if restored is not None else None)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=device)

    model = compile_student(bare, config.runtime, wrap) if config.runtime.compile else wrap(bare)
    data_device = "cpu" if device.type == "cpu" else str(device)
    exact = config.scaling.min_workers == 0
    state = None
    if restored is not None:
        state = (state_for_world(restored.loader, train_shards, world, rank) if resized
                 else restored.loader.get(str(rank)))
    loader = TrainLoader(train_shards, config.data, world, rank, data_device, threads=options.loader_threads,
                         dali_threads=options.dali_threads, state=state, exact_batch=exact)
    batch = effective_batch(config.data.batch_size, world, config.data.stream.repeats, exact, config.data.mix.enabled)
    schedule = build_schedule(config, batch, loader.steps_per_epoch)
    optimizer = build_optimizer(model, config, schedule.peak, device)
    ema = build_ema(model, config)
    if restored is not None:
        optimizer.load_state_dict(restored.optimizer)
        if ema is not None and restored.ema is not None:
            ema.module.load_state_dict(restored.ema)
    teacher, teacher_tags = build_teacher(config, device, train_shards, rank=rank, run_name=options.name)
    eval_batch = max(1, config.data.batch_size // world)
    eval_loader = EvalLoader(val_shards, config.data, eval_batch, world, rank, data_device, options.dali_threads)
    v2_loader = None
    if config.data.v2_url:
        v2_loader = EvalLoader(ShardSet.open(Location(config.data.v2_url), "val"), config.data, eval_batch, world,
                               rank, data_device, options.dali_threads)
    real = None
    if config.data.real_labels:
        real = load_real_labels(config.data.real_labels, val_shards.location, config.model.num_classes)
    tracker = _tracker(config, options, rank, train_shards.fingerprint, teacher_tags, restored)
    p = Parts(config, options, rank, world, device, model, optimizer, schedule, ema, teacher,
              BatchAugment(config.data.augment, config.data.mix, config.model.num_classes), loader, eval_loader,
              loss_config(config), tracker, train_shards.fingerprint, real_labels=real, v2_loader=v2_loader)
    if restored is not None:
        p.step = p.restored_from = restored.step
        p.last_eval = dict(restored.extra.get("eval", {}))
    # the seed of this rank's stochastic layers (drop path) and erasing noise, DeiT's seed + rank
    torch.manual_seed(config.runtime.seed + rank)
    if restored is not None and not resized and str(rank) in restored.rng:
        restore_rng(restored.rng[str(rank)])  # continue each rank's streams exactly
    if rank == 0:
        log.info("training %s: %d steps (%d per epoch), effective global batch %d, peak lr %.3g, %s, from %s",
                 config.model.name, schedule.total_steps, loader.steps_per_epoch, batch, schedule.peak, device,
                 f"step {p.step}" if restored is not None else "scratch")
    return p


def _student(config: TrainConfig, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The bare student: built with the run's seed (the same initial weights on every rank; DDP broadcasts
    rank 0's anyway), then a checkpoint's ``state`` or ``model.pretrained_path``, in training form."""
    torch.manual_seed(config.runtime.seed)
    model = config.model.build()
    if state is not None:
        model.load_state_dict(state)
    elif config.model.pretrained_path:
        load_pretrained(model, config.model.pretrained_path)
    if config.model.distilled:
        model.set_distilled_training(True)  # timm: return (cls, dist) logits in training mode
    if config.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


BLOCK_LISTS = ("blocks", "blocks_token_only")  # timm's ViT/DeiT/CaiT/ResMLP blocks; CaiT's class-attention ones


def block_lists(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    return [list(getattr(model, name)) for name in BLOCK_LISTS if len(getattr(model, name, ())) > 0]


def block_graphs(model: torch.nn.Module) -> int:
    """How many kinds of block ``model`` has: one per distinct block of each list (blocks that differ in a
    constant, such as DeiT's drop-path rate growing block by block, each compile a graph of their own; a
    block can also recompile once for other inputs: CaiT's first class-attention block sees the class
    token expanded, the next ones a computed one)."""
    return sum(len({repr(block) for block in blocks}) for blocks in block_lists(model))


def resolve_compile_scope(model: torch.nn.Module, scope: str) -> str:
    """``runtime.compile_scope=auto``: per block when each block list is uniform (one graph a list: CaiT,
    DeiT III, ResMLP), else the whole model (DeiT's growing drop-path rate); other scopes as given."""
    if scope != "auto":
        return scope
    lists = block_lists(model)
    return "blocks" if lists and block_graphs(model) == len(lists) else "model"


def compile_blocks(model: torch.nn.Module, backend: str) -> int:
    """``runtime.compile_scope=blocks``: ``torch.compile`` each block of ``model``'s block lists in place
    (``nn.Module.compile``: the module and its state dict keys stay as they are, so DDP, checkpoints and EMA
    see the bare model). Identical blocks share one compiled graph. Returns how many blocks."""
    import torch._dynamo.config

    lists = block_lists(model)
    blocks = [block for blocks in lists for block in blocks]
    if not blocks:
        raise ConfigError([f"runtime.compile_scope=blocks but {type(model).__name__} has no "
                           f"{' or '.join(BLOCK_LISTS)} to compile: set runtime.compile_scope=model"])
    graphs = block_graphs(model)
    if graphs > len(lists):
        log.warning("runtime.compile_scope=blocks: the %d blocks make %d distinct graphs (their drop-path rates "
                    "differ), each compiled on its own, which is slower than one whole-model compile; set "
                    "model.drop_path_uniform=true or runtime.compile_scope=model (or auto)", len(blocks), graphs)
    # past torch.compile's recompile limit the rest would silently run eager: room for a few graphs a block
    # (a block's own constants; a new batch size recompiles once, with a dynamic batch dimension)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks) + 8)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def compile_student(model: torch.nn.Module, runtime: Any, wrap: Any = None) -> torch.nn.Module:
    """``runtime.compile``'s student, in its ``compile_scope`` (auto resolved on ``model``, the bare one):
    its blocks compiled in place before ``wrap`` (DDP), or ``wrap``'s module compiled whole."""
    wrap = wrap or (lambda module: module)
    if resolve_compile_scope(model, runtime.compile_scope) == "blocks":
        compile_blocks(model, runtime.compile_backend)
        return wrap(model)
    return torch.compile(wrap(model), backend=runtime.compile_backend)


def local_parts(config: TrainConfig, device: torch.device, teacher: TeacherFn | None = None,
                loader: TrainLoader | None = None, eval_loader: EvalLoader | None = None, steps_per_epoch: int = 1000,
                compile_model: bool = False) -> Parts:
    """Parts for one process without Ray (rank 0 of 1, no DDP, no tracking, nothing restored): the GPU
    benchmark and tests build the same step and evaluation as a worker does."""
    model = _student(config).to(device)
    if compile_model:
        model = compile_student(model, config.runtime)
    schedule = build_schedule(config, config.data.batch_size, max(steps_per_epoch, 1))
    optimizer = build_optimizer(model, config, schedule.peak, device)
    return Parts(config, RunOptions(), 0, 1, device, model, optimizer, schedule, build_ema(model, config), teacher,
                 BatchAugment(config.data.augment, config.data.mix, config.model.num_classes), loader, eval_loader,
                 loss_config(config), NullTracker(), "")


class TeacherFn:
    """Distillation targets for a batch: ``(x, batch, mix) -> logits [N, C]``."""

    def __call__(self, x: torch.Tensor, batch: Batch | None, mix: MixParams | None) -> torch.Tensor:
        raise NotImplementedError


class OnlineTeacher(TeacherFn):
    """The teacher run on the same mixed batch the student sees, as DeiT does."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor, batch: Batch | None, mix: MixParams | None) -> torch.Tensor:
        return self.model(x)


class CachedTeacher(TeacherFn):
    """Precomputed logit maps pooled over each view's crop box (or a replayed crop's stored output), mixed
    with the batch's lambda."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def __call__(self, x: torch.Tensor, batch: Batch | None, mix: MixParams | None) -> torch.Tensor:
        if batch is None or mix is None:
            raise ValueError("a teacher cache labels the views of a loader batch: pass the batch and its mix")
        return mixed(self.cache.logits(batch.rows, batch.boxes, x.device, batch.view_ids), mix.lam)


class _ConstantTeacher(TeacherFn):
    """The same logits for every batch: the distillation term at no teacher cost (``RunOptions.bench``)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, x: torch.Tensor, batch: Batch | None, mix: MixParams | None) -> torch.Tensor:
        return self.logits


def build_teacher(config: TrainConfig, device: torch.device, shards: ShardSet | None = None, rank: int = 0,
                  run_name: str = "run") -> tuple[TeacherFn | None, dict[str, str]]:
    """The teacher (online model in eval mode without gradients, the cache, or the run's teacher actors)
    and its identity (tags); None without distillation."""
    d = config.distill
    if d.kind == "none":
        return None, {}
    identity = {"teacher": f"{d.teacher.name}@{d.teacher.img_size}", "teacher.weights": d.teacher.pretrained_path or "",
                "teacher.source": d.source}
    if d.source == "cache":
        expect = expected_identity(TeacherSpec(d.teacher.name, d.teacher.pretrained_path or None,
                                               config.model.num_classes, d.teacher.img_size))
        if not d.teacher.pretrained_path:  # no weights named: any cache of this teacher and data will do
            del expect["weights_sha256"]
        # refuses other data, another teacher, or (a replay cache) other crops than the run's
        cache = TeacherCache(Location(d.cache_url), shards, expect, augment=config.data.augment)
        identity.update({"teacher.sha256": cache.info["teacher"]["weights_sha256"], "teacher.cache": d.cache_url})
        return CachedTeacher(cache), identity
    if d.source == "remote":
        remote = RemoteTeacher.connect(config, run_name, rank, device.type == "cuda")
        found = remote.identity()
        if d.teacher.pretrained_path:
            identity["teacher.sha256"] = found["sha256"]
        else:
            identity["teacher.weights"] = "random"
        identity["teacher.actors"] = str(d.remote_actors)
        return remote, identity
    teacher = d.teacher.build()
    if d.teacher.pretrained_path:
        info = load_pretrained(teacher, d.teacher.pretrained_path)
        identity["teacher.sha256"] = info["sha256"]
    else:
        log.warning("distill.teacher.pretrained_path is not set: the teacher has random weights")
        identity["teacher.weights"] = "random"
    teacher = Fp32Head(ready_for_inference(teacher, device, config.runtime.channels_last))
    if d.compile_teacher:
        teacher = torch.compile(teacher, backend=config.runtime.compile_backend)
    return OnlineTeacher(teacher), identity


def _restore(options: RunOptions, fingerprint: str) -> TrainState | None:
    """The latest checkpoint Ray hands this worker group, else ``options.resume``, else None."""
    import ray.train

    found = ray.train.get_checkpoint()
    if found is not None:
        try:
            with found.as_directory() as folder:
                return load_checkpoint(folder, expect_fingerprint=fingerprint)
        except CorruptCheckpoint as exc:  # a flipped bit or a lost file: the one before it will do
            newest = checkpoint_step(found.path)
            older = [path for path in checkpoints_newest_first(options.run_dir or "")
                     if checkpoint_step(path) < newest]
            log.warning("the latest checkpoint cannot be used (%s); resuming from the newest intact one before it",
                        exc)
            return load_newest_intact(older, expect_fingerprint=fingerprint)
    if options.resume:
        path = resolve_checkpoint(options.resume)  # a checkpoint, or the newest in a folder (local or URL)
        if path is None:
            raise CheckpointError(f"resume={options.resume!r}: no complete checkpoint there")
        return load_checkpoint(path, expect_fingerprint=fingerprint)
    return None


def _check_restored(restored: TrainState, config: TrainConfig, rank: int, world: int) -> bool:
    """Refuse a worker count the checkpoint's loader states cannot serve, unless the run is elastic (then
    True: the loader resumes at the next pass for this worker count); warn about config changes."""
    resized = len(restored.loader) != world or str(rank) not in restored.loader
    if resized and config.scaling.min_workers > 0:
        if rank == 0:
            log.warning("elastic run resized: the checkpoint at step %d was written by %d workers, this group has "
                        "%d; training goes on from step %d at the start of the next pass of the %d-worker sample "
                        "order (the rest of the interrupted pass is skipped)", restored.step, len(restored.loader),
                        world, restored.step, world)
    elif resized:
        raise CheckpointError(
            f"the checkpoint at step {restored.step} was written by {len(restored.loader)} workers, this run has "
            f"{world}: the sample order depends on the worker count; resume with "
            f"scaling.num_workers={len(restored.loader)}, make the run elastic (scaling.min_workers), or start a new "
            "run from its weights (model.pretrained_path)"
        )
    now = safe_config(config)
    changed = sorted(k for k in set(now) | set(restored.config) if now.get(k) != restored.config.get(k))
    if changed and rank == 0:
        log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
    return resized


def _tracker(config: TrainConfig, options: RunOptions, rank: int, fingerprint: str, teacher: dict[str, str],
             restored: TrainState | None) -> NullTracker:
    if rank != 0 or not options.tracking_uri:
        return NullTracker()
    tags = {"code_version": options.code_version, "ray_job_id": options.ray_job_id, "dataset.fingerprint": fingerprint,
            "recipe.model": config.model.name, **teacher}
    spec = TrackingSpec(
        tracking_uri=options.tracking_uri, experiment=config.tracking.experiment,
        run_name=config.tracking.run_name or options.name, run_dir=options.run_dir,
        known_run_id=restored.extra.get("mlflow_run_id") if restored is not None else None,
        params=safe_config(config), tags={k: v for k, v in tags.items() if v},
        resumed_at_step=restored.step if restored is not None else None,
        system_metrics_every_s=config.tracking.system_metrics_every_s,
    )
    return Tracker(spec)


# ---------------------------------------------------------------------------------------------- collectives


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op without a process group); float64 on the host in and out."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    moved = values.to(device)
    dist.all_reduce(moved)
    return moved.cpu()


def _all_gather(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
