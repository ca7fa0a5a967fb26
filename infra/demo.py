"""The main job on the embedded default: the whole system, for real, on a laptop-sized problem.

1. scikit-learn's handwritten digits (shipped in the package) -> an ImageNet-style tree of JPEGs;
2. `pipeline build-shards` -> train/val shards (a local folder, or ``--shards-url`` e.g. an s3:// bucket);
3. a small convnet teacher trained through Ray Train, then `teacher-cache build` with it;
4. a small DeiT with repeated augmentation, distilled from the cache, and the same student without
   distillation, each through Ray Train with 2 workers (CPU when there is no GPU); ``--students
   cache,replay,online`` compares the teacher's three sources, ``--data mosaic`` on images whose crops
   can change the label;
5. everything logged to one MLflow store; prints the accuracies and how to open the MLflow UI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("demo")


def _train(recipe: str, overrides: list[str], storage: Path, name: str) -> dict:
    from trainer import recipes
    from trainer.overrides import apply_overrides
    from trainer.run import run

    result = run(apply_overrides(recipes.get(recipe), overrides), storage_path=str(storage), name=name)
    return result.return_value


def _device_overrides() -> list[str]:
    """The demo recipes train on 2 CPU workers; with GPUs, the same command uses them (one worker each)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return ["scaling.use_gpu=true", f"scaling.num_workers={min(2, torch.cuda.device_count())}"]


def _top1(summary: dict, head: str = "top1") -> float:
    evals = summary.get("eval") or {}
    for key in (f"eval/{head}", head, "eval/top1_cls"):
        if key in evals:
            return float(evals[key])
    return float("nan")


STUDENTS = {  # distilled students besides the plain one: row name, teacher source
    "cache": "distilled (cache)",
    "replay": "distilled (replay cache)",
    "online": "distilled (online teacher)",
}
# demo: the mosaic at 64 px with the random resized crop's full range (small crops are where labels change);
# the student keeps the digits' 8 x 8 = 64 patches
MOSAIC = ["data.augment.image_size=64", "model.img_size=64", "data.augment.scale=[0.08,1.0]"]
MOSAIC_STUDENT = ["model.patch_size=8", "distill.teacher.img_size=64"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.demo import IMAGE_SETS

    parser = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-data", help="working folder (default demo-data)")
    parser.add_argument("--shards-url", help="where to build the shards (default: OUT/shards)")
    parser.add_argument("--quick", action="store_true", help="a shortened run (CI): fewer epochs")
    parser.add_argument("--data", choices=tuple(IMAGE_SETS), default="digits",
                        help="digits (32 px), or mosaic (64 px: each image also shows a small digit of another "
                             "class, so that a crop can change the label; pipeline.demo.write_mosaic_tree)")
    parser.add_argument("--students", default="cache",
                        help="distilled students to train beside the plain one, comma-separated: cache (logit "
                             "maps), replay (a replay cache of the students' own crops, one per epoch), online "
                             "(default: cache)")
    parser.add_argument("--seed", type=int, help="the runs' seed (runtime.seed, data.stream.seed; default: the "
                                                 "recipes')")
    args = parser.parse_args(argv)
    students = list(dict.fromkeys(s for s in args.students.split(",") if s))  # in order, each once
    if not students or any(s not in STUDENTS for s in students):
        parser.error(f"--students {args.students!r}: choose from {', '.join(STUDENTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.build import BuildConfig, build_shards
    from pipeline.storage import Location
    from teacher_cache.build import CacheBuildConfig, build_cache
    from teacher_cache.teacher import TeacherSpec
    from trainer import recipes
    from trainer.overrides import apply_overrides

    out = Path(args.out).resolve()
    shards = args.shards_url or str(out / "shards")
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    epochs = {"teacher": 4, "student": 9} if args.quick else {"teacher": 10, "student": 30}
    write_tree, size = IMAGE_SETS[args.data]
    data, student_data = (MOSAIC, MOSAIC_STUDENT) if args.data == "mosaic" else ([], [])
    counts = write_tree(out / "images", size=size)
    log.info("step 1/5: %s real digit images as JPEGs in %s", counts, out / "images")
    for split in ("train", "val"):
        build_shards(BuildConfig(src=str(out / "images"), dst=Location(shards), split=split, shard_bytes=1_000_000))
    log.info("step 2/5: shards in %s", shards)
    common = [f"data.train_url={shards}", f"data.val_url={shards}", f"tracking.tracking_uri={tracking}",
              "tracking.experiment=distillery-demo", *_device_overrides(), *data,
              *([] if args.seed is None else [f"runtime.seed={args.seed}", f"data.stream.seed={args.seed}"])]
    runs = out / "runs"
    teacher = _train("demo_teacher", [*common, f"schedule.epochs={epochs['teacher']}", "tracking.run_name=teacher"],
                     runs, "teacher")
    log.info("step 3/5: teacher trained, top-1 %.1f%%", _top1(teacher))
    spec = TeacherSpec("resnet10t", str(runs / "teacher"), 10, size)
    student = [*common, *student_data, f"schedule.epochs={epochs['student']}"]
    distill = [f"distill.teacher.pretrained_path={runs / 'teacher'}"]
    folders = {"cache": out / "teacher-cache", "replay": out / "teacher-replay"}
    sources = {"online": ["distill.source=online"]}
    if "cache" in students:
        sources["cache"] = ["distill.source=cache", f"distill.cache_url={folders['cache']}"]
        build_cache(CacheBuildConfig(shards=Location(shards), out=Location(str(folders["cache"])), topk=5,
                                     overwrite=True, teacher=spec))
    if "replay" in students:  # the crops the students cut, as many per image as they see in training
        views = epochs["student"]
        sources["replay"] = ["distill.source=cache", f"distill.cache_url={folders['replay']}",
                             f"data.augment.replay_views={views}"]
        augment = apply_overrides(recipes.get("demo_deit_tiny_distill"), [*student, *sources["replay"]]).data.augment
        build_cache(CacheBuildConfig(shards=Location(shards), out=Location(str(folders["replay"])), topk=5,
                                     overwrite=True, teacher=spec, augment=augment, views=views,
                                     seed=augment.replay_seed, batch_size=256))
    log.info("step 4/5: teacher cache: %s",
             ", ".join(str(folders[n]) for n in students if n in folders) or "none (the teacher runs online)")
    rows = [("teacher (resnet10t)", _top1(teacher))]
    plain = _train("demo_deit_tiny", [*student, "tracking.run_name=student"], runs, "student")
    rows.append(("student DeiT-tiny, no distillation", _top1(plain)))
    for name in students:
        run_name = "student-distilled" if name == "cache" else f"student-distilled-{name}"
        result = _train("demo_deit_tiny_distill", [*student, *sources[name], *distill,
                                                   f"tracking.run_name={run_name}"], runs, run_name)
        rows.append((f"student DeiT-tiny, {STUDENTS[name]}", _top1(result, "fused_top1")))
    log.info("step 5/5: students trained")
    print(f"\ndistillery demo: scikit-learn digits{' with a distractor (mosaic)' if args.data == 'mosaic' else ''}, "
          f"10 classes (chance 10%), top-1 on the val split")
    for name, value in rows:
        print(f"  {name:<48}{value:6.1f}%")
    print(f"\nMLflow: mlflow ui --backend-store-uri {tracking}   (then open http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
