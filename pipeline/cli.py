"""The `pipeline` command: build-shards, inspect, bench, demo-tree."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from pipeline.build import DEFAULT_SHARD_BYTES, BuildConfig, BuildError, build_shards
from pipeline.cli_errors import describe, user_errors
from pipeline.storage import Location, parse_storage_options

log = logging.getLogger("pipeline")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'256MB', '1GiB', '500000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 256MB, 1GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction between 0 and 1, e.g. 0.01")
    return value


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON",
                   help="fsspec options for the URL as a JSON object (e.g. endpoint_url); credentials are "
                        "better left to the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-shards", help="ImageNet-style folders -> WebDataset shards + parquet manifest")
    b.add_argument("--src", required=True, help="ImageNet root (holding train/, val/) or one split's folder")
    b.add_argument("--dst", required=True, help="destination folder URL: a path, file://, s3://, gs://")
    b.add_argument("--split", default="train", help="split to build (folder name under --src); default train")
    b.add_argument("--labels", help="label file for a flat split (LOC_val_solution.csv or '<file> <label>')")
    b.add_argument("--classes", help="JSON class list to number by (default: --dst's classes.json, "
                                     "else the sorted class folders)")
    b.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                   help="target bytes per shard (default 256MiB)")
    b.add_argument("--shard-samples", type=int, help="at most this many samples per shard")
    b.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (recorded)")
    b.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds PX (off by default)")
    b.add_argument("--verify", choices=("header", "decode"), default="header",
                   help="header: parse headers and check JPEG end markers (fast, default); "
                        "decode: fully decode every image")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    b.add_argument("--max-bad", type=_fraction, default=0.01,
                   help="fail when more than this fraction of image files is unusable (default 0.01)")
    b.add_argument("--overwrite", action="store_true", help="replace a different earlier build of the split")
    _add_storage(b)

    i = sub.add_parser("inspect", help="check shards against their manifest and print a summary")
    i.add_argument("url", help="the --dst of build-shards")
    i.add_argument("--split", default="train")
    i.add_argument("--decode", action="store_true", help="also decode every image (slow)")
    _add_storage(i)

    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bb = bench_sub.add_parser("build", help="build-shards vs a plain copy of the same bytes")
    bb.add_argument("--src", help="ImageNet-style tree (default: generate one)")
    bb.add_argument("--images", type=int, default=2000, help="images to generate when --src is not given")
    bb.add_argument("--split", default="train")
    bb.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    bb.add_argument("--shard-size", type=parse_size, default=16 * 2**20,
                    help="default 16MiB, so that a bench-sized tree spreads over the workers")
    bb.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")

    bs = bench_sub.add_parser("stream", help="this loader (repeats 1 and 3) vs timm+PIL, views/s")
    bs.add_argument("--shards", help="URL of built shards (default: generate ImageNet-like ones)")
    bs.add_argument("--images", type=int, default=600, help="images to generate when --shards is not given")
    bs.add_argument("--batch", type=int, default=48, help="views per batch (a multiple of 3)")
    bs.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reader threads / DALI threads / "
                    "DataLoader processes, the same for every loader")
    bs.add_argument("--views", type=int, default=960, help="views to time per loader and round")
    bs.add_argument("--rounds", type=int, default=5, help="the three full-augmentation loaders run in turn this "
                    "many times; rates and ratios are medians over the rounds (a busy machine drifts)")
    bs.add_argument("--size", type=int, default=224)

    d = sub.add_parser("demo-tree", help="write scikit-learn's digits as an ImageNet-style JPEG tree")
    d.add_argument("--dst", required=True, help="folder to create (train/ and val/ inside)")
    d.add_argument("--size", type=int, default=32, help="side of the JPEGs in pixels (default 32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except user_errors(BuildError) as exc:  # DatasetError is a ValueError
        log.error("%s", describe(exc))
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "build-shards":
        dst = Location(args.dst, parse_storage_options(args.storage_options))
        result = build_shards(BuildConfig(
            src=args.src, dst=dst, split=args.split, seed=args.seed, shard_bytes=args.shard_size,
            max_shard_samples=args.shard_samples, max_side=args.max_side,
            verify_decode=args.verify == "decode", workers=args.workers, max_bad=args.max_bad,
            labels_file=args.labels, classes_file=args.classes, overwrite=args.overwrite))
        info = result.info
        print(f"{info['split']}: {info['num_samples']} samples, {info['num_shards']} shards, "
              f"{info['report']['bad']} bad, {info['report']['converted']} converted -> {args.dst}\n"
              f"fingerprint {info['fingerprint']}")
        return 0
    if args.command == "inspect":
        from pipeline.inspect import inspect

        result = inspect(Location(args.url, parse_storage_options(args.storage_options)), args.split,
                         decode=args.decode)
        print(result.summary())
        return 0 if result.ok else 1
    if args.command == "bench" and args.bench == "build":
        from pipeline.bench import bench_build

        print(bench_build(src=args.src, images=args.images, split=args.split, workers=args.workers,
                          shard_bytes=args.shard_size, repeat=args.repeat))
        return 0
    if args.command == "bench" and args.bench == "stream":
        from pipeline.bench_stream import bench_stream

        print(bench_stream(shards_url=args.shards, images=args.images, batch=args.batch, workers=args.workers,
                           views=args.views, size=args.size, rounds=args.rounds))
        return 0
    if args.command == "demo-tree":
        from pipeline.demo import write_digits_tree

        counts = write_digits_tree(args.dst, size=args.size)
        print(f"wrote {counts} to {args.dst}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
