"""``python -m trainer.bench RECIPE [key=value ...]``: is the training step fed? One recipe's step rates, in one run.

Every row is the trainer itself: ``trainer.run.run`` -> Ray Train's ``TorchTrainer`` -> the worker loop of
``trainer.worker``, stopped after ``--warmup`` + ``--steps`` steps by its benchmark hook (``RunOptions.bench``:
no evaluation, no checkpoint), which times the last ``--steps`` steps as the trainer's logs do: views per
second and the data-wait fraction (the share of step time spent in ``next(batches)``).

1. model only: one random batch kept on the device (no loader); a teacher, if any, is replaced by constant
   logits, so the loss is the recipe's but no teacher runs. The step alone: batch augmentation, forward,
   loss, backward, optimizer.
2. model + teacher: the same with the recipe's teacher (the online forward, or the cache's lookup).
3. full pipeline, 1 worker: shards -> stream -> DALI -> batch augmentation -> teacher -> step.
4. full pipeline, N workers (``--workers``): the same on N Ray Train workers (DDP), per worker.
5. with ``--checkpoint-every K``: model only, writing a checkpoint every K timed steps (Ray's report, the
   copy to the run's storage and its commit included), on the training thread (``checkpoint.background=
   false``) and in the background (the default); the time the training thread loses counts as step time,
   waiting for a background write still running included (the last one's rest too, at the end). Choose
   K so that a write fits in K steps, as it does at the default 1000: a K it does not fit in measures
   the waits, not the background.

Each worker keeps the recipe's per-worker batch (``data.batch_size / scaling.num_workers``), so the rows
compare per-worker (per-GPU) rates as workers are added. Targets (issue 5): full pipeline >= 0.95 x model
only, and per worker at 2 workers >= 0.95 x at 1. Weights are random, student and teacher: nothing is
downloaded, and step time does not depend on them. Without ``--shards``, ImageNet-like JPEGs are generated
at the recipe's resolution (ImageNet's ~460x350 images scaled by ``image_size / 224``) into train and val
splits (val is the same files; nothing is evaluated). A recipe that reads a teacher cache gets one built
from the random teacher over those shards, unless ``--shards`` and ``distill.cache_url`` are both given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["TARGET", "BenchError", "Row", "Ratio", "Report", "bench", "synthetic_shards", "main"]

TARGET = 0.95  # issue 5: full pipeline / model only, and per worker at 2 workers / at 1


class BenchError(ValueError):
    """Settings the bench cannot run with; the message says which and what to use."""


@dataclass(frozen=True)
class Row:
    """One configuration: views per second per worker and the data-wait fraction (None: not run, see note)."""

    name: str
    workers: int
    views_per_s: float | None  # per worker
    data_wait: float | None
    note: str = ""
    views: int = 0  # views timed, all workers together (steps x views per worker x workers)


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two rows' rates, against ``target`` (None: for information)."""

    name: str
    numerator: str
    denominator: str
    value: float | None
    target: float | None

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        if self.target is None:
            return "-"
        return "met" if self.value >= self.target else "missed"


@dataclass
class Report:
    """What ``trainer.bench`` prints (``table``) and writes with ``--out`` (``as_dict``)."""

    recipe: str
    title: list[str]
    rows: list[Row]
    ratios: list[Ratio]
    notes: list[str]
    settings: dict[str, Any]

    def table(self) -> str:
        rows = [("row", "workers", "views/s per worker", "data wait", "note")]
        rows += [(r.name, str(r.workers), _fmt(r.views_per_s, "{:.1f}"), _fmt(r.data_wait, "{:.1%}"), r.note)
                 for r in self.rows]
        ratios = [("ratio", "value", "target", "verdict")]
        ratios += [(r.name, _fmt(r.value, "{:.3f}"), _fmt(r.target, ">= {:.2f}"), r.verdict) for r in self.ratios]
        return "\n".join([*self.title, *_columns(rows, right=(1, 2, 3)), "", *_columns(ratios, right=(1, 2)), "",
                          *[f"* {note}" for note in self.notes]])

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "title": self.title, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows],
                "ratios": [{**asdict(r), "verdict": r.verdict} for r in self.ratios], "notes": self.notes}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _columns(rows: list[tuple[str, ...]], right: tuple[int, ...]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


# ---------------------------------------------------------------------------------------------- the bench


def bench(recipe: str, config: TrainConfig, steps: int = 50, warmup: int = 10, workers: Sequence[int] = (1, 2),
          shards_url: str | None = None, images: int | None = None, checkpoint_every: int = 0) -> Report:
    """Run every row of the table for ``config`` (recipe ``recipe`` with its overrides) and return the report.

    ``workers``: the full pipeline's worker counts (1 must be among them: it is the baseline); ``shards_url``:
    built shards (train and val splits) to read, else ``images`` generated ones (default: enough for 4 steps
    at the largest worker count, at least 512 and one per class); ``checkpoint_every``: K > 0 adds the
    checkpoint rows (5. above).
    """
    from trainer.run import connect_ray

    _validate(config)
    if steps < 1 or warmup < 0:
        raise BenchError(f"--steps {steps} --warmup {warmup}: need at least one timed step and no negative warm-up")
    workers = sorted(set(workers))
    if 1 not in workers or workers[0] < 1:
        raise BenchError(f"--workers {','.join(map(str, workers))}: include 1 (the baseline of the per-worker ratio)")
    if checkpoint_every and not 0 < checkpoint_every < steps:
        raise BenchError(f"--checkpoint-every {checkpoint_every}: must be between 1 and --steps - 1 ({steps - 1}), "
                         f"so that a checkpoint falls inside the timed steps")
    per_worker = _per_worker_batch(config)
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    connect_ray(max(workers))
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        root = Path(tmp)
        generated = shards_url is None
        if generated:
            count = max(images or max(512, 4 * per_worker * max(workers)), config.model.num_classes)
            shards_url, origin = synthetic_shards(root / "data", count, config.model.num_classes,
                                                  config.data.augment.image_size)
        else:
            origin = shards_url
        config = _timing_config(config, shards_url, root, cuda, generated)
        teacher = _teacher_label(config)
        measure = _Measure(config, per_worker, steps, warmup, root / "runs")
        rows = _rows(measure, teacher, workers, gpus if cuda else None)
        if checkpoint_every:
            rows += _checkpoint_rows(measure, checkpoint_every)
    notes = _notes(cuda) + (_checkpoint_notes(rows, steps, checkpoint_every) if checkpoint_every else [])
    return Report(recipe, _title(recipe, config, per_worker, teacher, cuda, gpus, origin, steps, warmup), rows,
                  _ratios(rows, workers), notes,
                  {"steps": steps, "warmup": warmup, "workers": workers, "per_worker_batch": per_worker,
                   "checkpoint_every": checkpoint_every,
                   "views_per_worker": _views_per_worker(config, per_worker), "device": "cuda" if cuda else "cpu",
                   "gpus": gpus, "data": origin})


def _rows(measure: _Measure, teacher: str, workers: Sequence[int], gpus: int | None) -> list[Row]:
    """Every row in table order; ``gpus``: None on a machine without GPUs (CPU workers)."""
    constant = ", constant teacher logits" if teacher else ""
    rows = [measure("model only", 1, "synthetic", teacher=False, note=f"one random batch on the device{constant}")]
    if teacher:
        rows.append(measure("model + teacher", 1, "synthetic", teacher=True, note=f"{teacher}, no loader"))
    else:
        rows.append(Row("model + teacher", 1, None, None, "the recipe has no teacher"))
    for n in workers:
        name = f"full pipeline, {n} worker{'s' if n > 1 else ''}"
        if gpus is not None and n > gpus:
            rows.append(Row(name, n, None, None, f"not run: needs {n} GPUs, this machine has {gpus}"))
            continue
        note = "shards -> stream -> DALI -> batch aug -> teacher -> step" if n == 1 else "Ray Train DDP"
        if n > 1 and gpus is None:
            note += f"; no GPU: {n} gloo workers share {os.cpu_count()} CPU cores, not a per-GPU figure"
        rows.append(measure(name, n, "loader", teacher=True, note=note))
    return rows


CHECKPOINT_ROWS = {False: "model only + checkpoints, on the training thread",
                   True: "model only + checkpoints, in the background"}


def _checkpoint_rows(measure: _Measure, every: int) -> list[Row]:
    """Model only with a checkpoint every ``every`` timed steps, written on the training thread, then in the
    background (``checkpoint.background``)."""
    return [measure(CHECKPOINT_ROWS[background], 1, "synthetic", teacher=False, checkpoint_every=every,
                    background=background, note=f"a checkpoint every {every} steps, Ray's report and commit included")
            for background in (False, True)]


def _checkpoint_notes(rows: list[Row], steps: int, every: int) -> list[str]:
    """The training thread's loss per checkpoint in seconds, from the rows' step times, and its share of
    training at the trainer's default checkpoint interval."""
    from trainer.config import CheckpointConfig

    by_name = {r.name: r for r in rows}
    base = by_name["model only"]
    if base.views_per_s is None:
        return []
    step_s = base.views / steps / base.views_per_s  # one step of the baseline row
    count = (steps - 1) // every  # checkpoints inside the timed steps (none after the last)
    interval = CheckpointConfig().every_n_steps
    out = []
    for name in CHECKPOINT_ROWS.values():
        row = by_name.get(name)
        if row is None or row.views_per_s is None:
            continue
        lost = max(0.0, (row.views / row.views_per_s - base.views / base.views_per_s) / count)
        out.append(f"{name}: the training thread lost {lost:.3f} s per checkpoint ({count} in {steps} steps), "
                   f"{lost / (lost + interval * step_s):.2%} of training at checkpoint.every_n_steps={interval} "
                   f"and the model-only step time ({step_s * 1e3:.1f} ms)")
    return out


class _Measure:
    """One row: ``trainer.run.run`` on ``n`` workers at the per-worker batch, with the worker's bench hook."""

    def __init__(self, config: TrainConfig, per_worker: int, steps: int, warmup: int, storage: Path):
        self.config, self.per_worker, self.steps, self.warmup, self.storage = config, per_worker, steps, warmup, storage
        self.runs = 0

    def __call__(self, name: str, n: int, data: str, teacher: bool, note: str, checkpoint_every: int = 0,
                 background: bool = True) -> Row:
        from trainer.run import run
        from trainer.worker import RunOptions

        config = replace(self.config, scaling=replace(self.config.scaling, num_workers=n),
                         data=replace(self.config.data, batch_size=self.per_worker * n),
                         checkpoint=replace(self.config.checkpoint, background=background))
        options = RunOptions(tracking_uri="off", log_model=False,
                             bench={"warmup": self.warmup, "steps": self.steps, "data": data, "teacher": teacher,
                                    "checkpoint_every": checkpoint_every})
        self.runs += 1
        log.info("trainer bench: %s (%d worker%s)", name, n, "s" if n > 1 else "")
        started = time.monotonic()
        result = run(config, storage_path=str(self.storage), name=f"bench-{self.runs}", options=options)
        timing = result.return_value["timing"]["bench"]
        log.info("trainer bench: %s took %.0f s (build %.1f s)", name, time.monotonic() - started,
                 result.return_value["timing"]["build_s"])
        if checkpoint_every:
            spent = result.return_value["timing"]
            note += (f"; {spent.get('checkpoints', 0)} written, {spent.get('checkpoint_write_s', 0.0):.2f} s writing"
                     f" and reporting, {spent.get('checkpoint_stall_s', 0.0):.2f} s of it on the training thread "
                     f"(of which {spent.get('checkpoint_wait_s', 0.0):.2f} s waiting for a write still running)")
        return Row(name, n, timing["views"] / timing["step_s"], timing["wait_s"] / timing["step_s"], note,
                   int(timing["views"]))


def _validate(config: TrainConfig) -> None:
    """``TrainConfig.validate()``, where an empty ``distill.cache_url`` is fine: the bench builds a cache."""
    d = config.distill
    if d.source == "cache" and not d.cache_url:
        config = replace(config, distill=replace(d, cache_url="(built by the bench)"))
    config.validate()


def _per_worker_batch(config: TrainConfig) -> int:
    batch, n = config.data.batch_size, config.scaling.num_workers
    if batch % n:
        raise BenchError(f"data.batch_size={batch} is not a multiple of scaling.num_workers={n}: the bench keeps "
                         f"the recipe's per-worker batch; make it a multiple")
    return batch // n


def _views_per_worker(config: TrainConfig, per_worker: int) -> int:
    from pipeline.loader import plan_batch

    repeats = config.data.stream.repeats
    return plan_batch(per_worker, 1, repeats, even=config.data.mix.enabled) * repeats


def _timing_config(config: TrainConfig, shards_url: str, root: Path, cuda: bool, generated: bool) -> TrainConfig:
    """The recipe as the bench runs it: these shards, random weights saved under ``root`` (student and
    teacher; a cache built from that teacher when the recipe reads one and none fits), GPUs if present."""
    data = replace(config.data, train_url=shards_url, val_url=shards_url)
    config = replace(config, data=data, model=replace(config.model, pretrained_path=None),
                     scaling=replace(config.scaling, use_gpu=cuda))
    d = config.distill
    if d.kind == "none":
        return config
    if d.source == "cache" and d.cache_url and not generated:  # the caller's cache of the caller's shards
        return replace(config, distill=replace(d, teacher=replace(d.teacher, pretrained_path=None)))
    weights = random_teacher_weights(config, root / "teacher-random.pth")
    d = replace(d, teacher=replace(d.teacher, pretrained_path=weights))
    if d.source == "cache":
        d = replace(d, cache_url=_random_teacher_cache(config, shards_url, str(weights), root / "cache"))
    return replace(config, distill=d)


def random_teacher_weights(config: TrainConfig, path: Path) -> str:
    """The recipe's teacher with random weights (seeded by the recipe), saved to ``path``."""
    torch.manual_seed(config.runtime.seed)
    torch.save(config.distill.teacher.build().state_dict(), path)
    return str(path)


def _random_teacher_cache(config: TrainConfig, shards_url: str, weights: str, out: Path,
                          workers: int | None = None) -> str:
    """A teacher cache of ``weights`` over the shards (``workers=0``: in this process, without Ray): a replay
    cache of the recipe's crops when it replays them (``data.augment.replay_views``), else logit maps."""
    from pipeline.storage import Location
    from teacher_cache.build import CacheBuildConfig, build_cache
    from teacher_cache.teacher import TeacherSpec

    t = config.distill.teacher
    log.info("trainer bench: building a teacher cache (%s, random weights) over %s", t.name, shards_url)
    augment = config.data.augment  # a recipe that replays crops gets a replay cache of them
    build_cache(CacheBuildConfig(shards=Location(shards_url), out=Location(str(out)), augment=augment,
                                 teacher=TeacherSpec(t.name, weights, config.model.num_classes, t.img_size),
                                 workers=workers, views=augment.replay_views, seed=augment.replay_seed))
    return str(out)


def synthetic_shards(root: Path, images: int, classes: int, size: int) -> tuple[str, str]:
    """``images`` ImageNet-like JPEGs (scaled by ``size / 224``) over ``classes`` classes, built into a train
    and a val split of the same files; returns the shards' URL and a description."""
    from pipeline.build import BuildConfig, build_shards
    from pipeline.storage import Location
    from pipeline.synthetic import write_imagenet_like

    log.info("trainer bench: generating %d ImageNet-like JPEGs for %d px", images, size)
    src = root / "src"
    train = write_imagenet_like(src, images, classes=classes, scale=size / 224)
    (src / "val").symlink_to(train.name)
    files = list(train.rglob("*.JPEG"))
    total = sum(f.stat().st_size for f in files)
    dst = Location(str(root / "shards"))
    processes = max(1, min(os.cpu_count() or 1, total >> 25))  # small sets: no process pool to start
    for split in ("train", "val"):
        build_shards(BuildConfig(src=str(src), dst=dst, split=split, shard_bytes=max(total // 16, 1 << 16),
                                 workers=processes))
    w, h = round(size / 224 * 460), round(size / 224 * 350)
    return dst.url, (f"{images} generated ImageNet-like JPEGs over {classes} classes "
                     f"(~{w}x{h} px, {total / len(files) / 1e3:.0f} KB avg)")


def _teacher_label(config: TrainConfig) -> str:
    d = config.distill
    if d.kind == "none":
        return ""
    if d.source == "cache":
        return f"cached teacher {d.teacher.name}@{d.teacher.img_size} (lookup)"
    return f"online teacher {d.teacher.name}@{d.teacher.img_size} (forward)"


def _title(recipe: str, config: TrainConfig, per_worker: int, teacher: str, cuda: bool, gpus: int, origin: str,
           steps: int, warmup: int) -> list[str]:
    k = config.data.stream.repeats
    views = _views_per_worker(config, per_worker)
    if cuda:
        device = f"cuda ({torch.cuda.get_device_name(0)}, {gpus} GPU{'s' if gpus > 1 else ''}), " + (
            "bf16 autocast" if config.runtime.bf16 else "fp32")
    else:
        device = f"cpu ({os.cpu_count()} cores, no GPU), fp32"
    r = config.runtime
    return [
        f"trainer bench {recipe}: {config.model.name} at {config.data.augment.image_size} px, {views} views per "
        f"worker per step ({views // k} images x {k}; recipe batch {per_worker} per worker), "
        f"{teacher or 'no teacher'}{', random weights' if teacher else ''}",
        f"device {device}, compile {'on' if r.compile else 'off'}, channels_last {'on' if r.channels_last else 'off'}; "
        f"data {origin}; {steps} steps timed after {warmup} warm-up steps, per row",
    ]


def _ratios(rows: list[Row], workers: Sequence[int]) -> list[Ratio]:
    by_name = {r.name: r for r in rows}

    def ratio(name: str, num: str, den: str, target: float | None) -> Ratio:
        a, b = by_name[num].views_per_s, by_name[den].views_per_s
        return Ratio(name, num, den, a / b if a is not None and b is not None else None, target)

    one = "full pipeline, 1 worker"
    out = [ratio("full pipeline (1 worker) / model only", one, "model only", TARGET),
           ratio("full pipeline (1 worker) / model + teacher: the loader's cost", one, "model + teacher", None)]
    out += [ratio(f"per worker: {n} workers / 1 worker", f"full pipeline, {n} workers", one, TARGET)
            for n in workers if n > 1]
    if CHECKPOINT_ROWS[True] in by_name:
        out += [ratio("checkpoints on the training thread / none", CHECKPOINT_ROWS[False], "model only", None),
                ratio("checkpoints in the background / none", CHECKPOINT_ROWS[True], "model only", None)]
    return out


def _notes(cuda: bool) -> list[str]:
    notes = [
        "views/s per worker: views (images x repeats) trained per second of step time on each worker; "
        "data wait: the share of step time spent waiting for the next batch (the trainer's data_wait_frac).",
        "model only and model + teacher include the batch augmentation (it runs in the step, on the device).",
        "Weights are random (student and teacher; nothing is downloaded): step time does not depend on them.",
    ]
    if not cuda:
        notes.append("No GPU: CPU figures say nothing about the GPU targets (issue 5); each Ray worker gets 1 CPU.")
    return notes


# ---------------------------------------------------------------------------------------------- command line


def _workers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected worker counts such as 1,2") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe name (python -m trainer.main --list)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, as trainer.main takes")
    p.add_argument("--steps", type=int, default=50, help="steps timed per row (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="steps run first and not timed, per row (default 10)")
    p.add_argument("--workers", type=_workers, default=[1, 2], metavar="1,2",
                   help="worker counts of the full-pipeline rows (default 1,2)")
    p.add_argument("--shards", metavar="URL", help="built shards (train and val splits) to read instead of "
                   "generated ones")
    p.add_argument("--images", type=int, help="generated images (default: 4 steps' worth at the most workers, "
                   ">= 512, >= one per class)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="add the checkpoint rows: model only with a checkpoint every K timed steps, on the training "
                   "thread and in the background (default 0: no such rows)")
    p.add_argument("--out", metavar="PATH", help="also write the results as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (and write ``--out``); exit status 2 for a usage or config error."""
    from pipeline.manifest import DatasetError
    from trainer import recipes
    from trainer.config import ConfigError
    from trainer.overrides import OverrideError, apply_overrides

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = apply_overrides(recipes.get(args.recipe), args.overrides)  # validated by bench()
        report = bench(args.recipe, config, steps=args.steps, warmup=args.warmup, workers=args.workers,
                       shards_url=args.shards, images=args.images, checkpoint_every=args.checkpoint_every)
    except (recipes.UnknownRecipe, OverrideError, ConfigError, DatasetError, BenchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table(), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
