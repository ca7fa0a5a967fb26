"""The `teacher-cache` command: build (a Ray job) and bench."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli_errors import describe, user_errors
from pipeline.config import AugmentConfig
from pipeline.demo import IMAGE_SETS
from pipeline.storage import Location, parse_storage_options
from pipeline.stream import StreamError
from teacher_cache.teacher import TeacherSpec
from trainer.checkpoint import CheckpointError
from trainer.recipes import UnknownRecipe

log = logging.getLogger("teacher-cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teacher-cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the teacher once over the shards and store crop-aware logit maps")
    b.add_argument("--teacher", required=True, help="timm model name, e.g. regnety_160")
    b.add_argument("--weights", help="checkpoint path or URL (timm or official DeiT format); nothing is downloaded")
    b.add_argument("--num-classes", type=int, default=1000)
    b.add_argument("--shards", required=True, help="URL of the shards built by `pipeline build-shards`")
    b.add_argument("--split", default="train")
    b.add_argument("--out", required=True, help="URL of the cache folder")
    b.add_argument("--resolution", type=int,
                   help="the teacher sees each whole image at R x R (default 224; with --views: the crops' size)")
    b.add_argument("--topk", type=int, default=10, help="logits kept per map location")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else 1; 0: in this process, no Ray)")
    b.add_argument("--views", type=int,
                   help="a replay cache: the teacher's outputs on this many fixed training crops per image, cut as "
                        "--recipe cuts them (train with data.augment.replay_views=N data.augment.replay_seed=S); "
                        "default: the recipe's data.augment.replay_views, else 0: logit maps")
    b.add_argument("--seed", type=int, help="with --views: which crops (default: the recipe's replay_seed, else 0)")
    b.add_argument("--recipe", help="with --views: the training recipe whose augmentation cuts the crops")
    b.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="with --recipe: the training run's overrides (e.g. data.augment.scale=[0.35,1.0])")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the teacher (default backend: inductor); a one-off cost per worker")
    b.add_argument("--storage-options", metavar="JSON", help="fsspec options for --shards and --out")
    bench = sub.add_parser("bench", help="agreement with the online teacher, bytes per image, step rates")
    bench.add_argument("--shards", help="shards URL (default: the --data set, generated on the spot)")
    bench.add_argument("--teacher", default="resnet10t")
    bench.add_argument("--weights", help="teacher weights (default: train a small one on the shards)")
    bench.add_argument("--resolution", type=int, help="cache resolution (default: --size)")
    bench.add_argument("--topk", type=int, default=5)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--teacher-steps", type=int, default=300)
    bench.add_argument("--data", choices=tuple(IMAGE_SETS), default="digits",
                       help="the set generated when no --shards is given: digits, or mosaic (a small digit of "
                            "another class in each image: a crop can change the label)")
    bench.add_argument("--size", type=int, help="side of the generated images and of the train views "
                                                "(default 32 for digits, 64 for mosaic)")
    return parser


def _augment(args: argparse.Namespace) -> tuple[AugmentConfig, int, int]:
    """The crops' settings, count and seed: the recipe's (with the run's overrides) for a replay cache,
    where ``--views`` / ``--seed`` may name what the recipe leaves open but not contradict it; defaults for
    maps (only mean and std are used)."""
    if not args.recipe:
        if args.override:
            raise ValueError("--override needs --recipe: the training run whose augmentation cuts the crops")
        if args.views:
            raise ValueError("--views needs --recipe: the training recipe whose augmentation cuts the crops")
        return AugmentConfig(), 0, 0  # a map cache: no crops, no seed
    from trainer import recipes
    from trainer.overrides import apply_overrides

    augment = apply_overrides(recipes.get(args.recipe), args.override).data.augment
    views = augment.replay_views if args.views is None else args.views
    seed = augment.replay_seed if args.seed is None else args.seed
    for flag, given, key, run in (("--views", views, "replay_views", augment.replay_views),
                                  ("--seed", seed, "replay_seed", augment.replay_seed)):
        if run and given != run:
            raise ValueError(f"{flag} {given} contradicts the run's data.augment.{key}={run}: drop one")
    if not views:
        raise ValueError("--recipe and --override choose a replay cache's crops: pass --views N too")
    return augment, views, seed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "build":
            from teacher_cache.build import CacheBuildConfig, build_cache

            options = parse_storage_options(args.storage_options)
            augment, views, seed = _augment(args)
            resolution = args.resolution or (augment.image_size if views else 224)
            info = build_cache(CacheBuildConfig(
                shards=Location(args.shards, options), out=Location(args.out, options), split=args.split,
                teacher=TeacherSpec(args.teacher, args.weights, args.num_classes, resolution),
                topk=args.topk, batch_size=args.batch, workers=args.workers, overwrite=args.overwrite,
                augment=augment, views=views, seed=seed, compile=args.compile))
            kind = (f"{info['views']['count']} replayed crops (seed {info['views']['seed']})" if info.get("views")
                    else f"map {info['map']['height']}x{info['map']['width']}")
            print(f"teacher cache: {info['num_samples']} images, {info['bytes_per_image']} bytes/image, "
                  f"{kind} top-{info['map']['k']} -> {args.out}")
            return 0
        from teacher_cache.bench import bench

        print(bench(args.shards, args.teacher, args.weights, args.resolution, args.topk, args.teacher_steps,
                    args.steps, args.size, data=args.data))
        return 0
    except user_errors(CheckpointError, StreamError, UnknownRecipe) as exc:  # CacheMismatch, TeacherError: ValueErrors
        log.error("%s", describe(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
