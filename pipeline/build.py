"""`pipeline build-shards`: an ImageNet-style folder tree -> WebDataset shards + manifest on any fsspec URL.

Flow: scan the source (list + stat only) -> plan (seeded global shuffle, cut by size) -> write the shards
in parallel processes, one task per shard -> assemble the manifest, report and dataset info.

Resumable: the plan is recorded in ``_build/<split>/plan.json`` and each finished shard leaves a part
file there. A re-run with the same inputs keeps the finished shards and writes only the missing ones;
the dataset info, written last, is the commit point of the whole build.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.manifest import (
    DatasetError,
    fingerprint,
    read_classes,
    read_info,
    write_classes,
    write_info,
    write_manifest,
)
from pipeline.plan import ShardPlan, make_plan, shard_glob
from pipeline.progress import Progress
from pipeline.shardwriter import ShardTask, build_dir, part_name, write_shard
from pipeline.sources import SourceError, SourceListing, scan
from pipeline.storage import Location, exists, read_json, write_json

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


class BuildError(RuntimeError):
    """The build cannot finish; the message says why and what to do."""


@dataclass(frozen=True)
class BuildConfig:
    src: str
    dst: Location
    split: str = "train"
    seed: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_shard_samples: int | None = None
    max_side: int | None = None
    verify_decode: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_bad: float = 0.01
    labels_file: str | None = None
    classes_file: str | None = None
    overwrite: bool = False


@dataclass
class BuildResult:
    info: dict[str, Any]
    report: dict[str, Any]
    shards_written: int
    shards_kept: int


def build_shards(cfg: BuildConfig) -> BuildResult:
    _validate(cfg)
    listing = _scan(cfg)
    plan = make_plan(cfg.split, listing.samples, cfg.seed, cfg.shard_bytes, cfg.max_shard_samples,
                     extra={"max_side": cfg.max_side, "verify_decode": cfg.verify_decode,
                            "classes": listing.classes})
    done = _complete_build(cfg, plan)
    if done is not None:
        log.info("split %r in %s is already built with these inputs (%d samples); nothing to do",
                 cfg.split, cfg.dst.url, done["num_samples"])
        return BuildResult(done, done.get("report", {}), 0, len(done["shards"]))
    parts = _resume_state(cfg, plan)
    kept = len(parts)
    pending = [i for i in range(len(plan.shards)) if i not in parts]
    log.info("building split %r: %d samples in %d shards (%d already complete) -> %s",
             cfg.split, len(listing.samples), len(plan.shards), kept, cfg.dst.url)
    parts.update(_write_pending(cfg, plan, listing, pending))
    return _finish(cfg, plan, listing, [parts[i] for i in range(len(plan.shards))], len(pending), kept)


def _validate(cfg: BuildConfig) -> None:
    if cfg.workers < 1:
        raise BuildError(f"--workers {cfg.workers}: must be at least 1")
    if not 0.0 <= cfg.max_bad <= 1.0:
        raise BuildError(f"--max-bad {cfg.max_bad}: must be a fraction between 0 and 1")
    if cfg.max_side is not None and cfg.max_side < 16:
        raise BuildError(f"--max-side {cfg.max_side}: too small; use e.g. 512 or leave it off")
    if not cfg.split or "/" in cfg.split or "-" in cfg.split:
        raise BuildError(f"--split {cfg.split!r}: use a plain name such as train or val")


def _scan(cfg: BuildConfig) -> SourceListing:
    classes = _given_classes(cfg)
    try:
        listing = scan(cfg.src, cfg.split, cfg.labels_file, classes)
    except SourceError as exc:
        raise BuildError(str(exc)) from None
    if not listing.samples:
        raise BuildError(f"{listing.split_dir}: no image files found for split {cfg.split!r}; "
                         f"nothing to build ({len(listing.skipped)} other files ignored)")
    for name in listing.empty_classes:
        log.warning("class folder %s/%s is empty: it keeps its index but has no samples",
                    listing.split_dir, name)
    return listing


def _given_classes(cfg: BuildConfig) -> list[str] | None:
    """The class list to number by: --classes, else the destination's classes.json (e.g. from train)."""
    if cfg.classes_file:
        try:
            with open(cfg.classes_file, encoding="utf-8") as handle:
                value = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise BuildError(f"--classes {cfg.classes_file}: cannot read a JSON class list ({exc})") from None
        classes = value.get("classes") if isinstance(value, dict) else value
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise BuildError(f"--classes {cfg.classes_file}: expected a JSON list of class names "
                             f"or a classes.json written by build-shards")
        return classes
    try:
        return read_classes(cfg.dst)
    except DatasetError as exc:
        raise BuildError(str(exc)) from None


def _complete_build(cfg: BuildConfig, plan: ShardPlan) -> dict[str, Any] | None:
    try:
        info = read_info(cfg.dst, cfg.split)
    except DatasetError:
        return None
    if info.raw.get("plan") == plan.digest:
        return info.raw
    if not cfg.overwrite:
        raise BuildError(
            f"{cfg.dst.url} already holds a different build of split {cfg.split!r} (other source files, "
            f"seed or options); pass --overwrite to replace it, or choose another --dst"
        )
    _remove_split(cfg)
    return None


def _remove_split(cfg: BuildConfig) -> None:
    fs, root = cfg.dst.fs_and_path()
    fs.invalidate_cache(root)
    old = fs.glob(f"{root}/{shard_glob(cfg.split)}") + [
        f"{root}/{cfg.split}.{suffix}" for suffix in ("dataset.json", "parquet", "report.json")]
    for path in old:
        if fs.exists(path):
            fs.rm(path)
    log.info("--overwrite: removed the previous build of split %r", cfg.split)


def _resume_state(cfg: BuildConfig, plan: ShardPlan) -> dict[int, dict[str, Any]]:
    """Parts of shards finished by an earlier run of the same plan (a different plan is refused)."""
    state = build_dir(cfg.dst, cfg.split)
    fs, root = state.fs_and_path()
    plan_path = f"{root}/plan.json"
    saved = _read_state_file(fs, plan_path, ("digest",)) if exists(fs, plan_path) else None
    # a damaged plan file (None) says nothing; the parts carry their own plan digests
    if saved is not None and saved["digest"] != plan.digest:
        if not cfg.overwrite:
            raise BuildError(
                f"{state.url} holds an unfinished build of split {cfg.split!r} with other inputs; "
                f"pass --overwrite to discard it (or restore the source tree and options it was run with)"
            )
        fs.rm(root, recursive=True)
    write_json(fs, plan_path, {"digest": plan.digest, "shards": len(plan.shards)})
    dfs, droot = cfg.dst.fs_and_path()
    parts: dict[int, dict[str, Any]] = {}
    fs.invalidate_cache(root)
    dfs.invalidate_cache(droot)
    for stale in dfs.glob(f"{droot}/.tmp-*-{shard_glob(cfg.split)}"):  # left by writers killed mid-shard
        dfs.rm(stale)
    listing = dfs.ls(droot, detail=True) if dfs.exists(droot) else []  # one listing, no request per shard
    sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in listing if e["name"].endswith(".tar")}
    for index in range(len(plan.shards)):
        path = f"{root}/{part_name(cfg.split, index)}"
        if not fs.exists(path):
            continue
        part = _read_state_file(fs, path, _PART_FIELDS)
        if part is None:
            continue  # damaged: that shard is written again
        complete = part["plan"] == plan.digest and (
            part["name"] is None or sizes.get(part["name"]) == part["bytes"])
        if complete:
            parts[index] = part
    return parts


_PART_FIELDS = ("plan", "index", "name", "bytes", "sha256", "rows", "skipped")


def _read_state_file(fs: Any, path: str, fields: tuple[str, ...]) -> dict[str, Any] | None:
    """A build-state file (plan or shard part), or None with a warning when it is damaged (not JSON, not an
    object, fields missing). The state only saves work: a damaged part means its shard is written again,
    a damaged plan file is rewritten (each part carries the plan digest it was written for)."""
    try:
        value = read_json(fs, path)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        value, why = None, f"not JSON ({exc})"
    else:
        missing = [f for f in fields if not isinstance(value, dict) or f not in value]
        why = f"missing {', '.join(missing)}" if missing else ""
    if why:
        log.warning("build state file %s is damaged (%s): ignoring it, the work it recorded is done again",
                    path, why)
        return None
    return value


def _write_pending(cfg: BuildConfig, plan: ShardPlan, listing: SourceListing,
                   pending: list[int]) -> dict[int, dict[str, Any]]:
    tasks = [ShardTask(cfg.dst, cfg.split, i, plan.shards[i], str(listing.split_dir), plan.digest,
                       cfg.max_side, cfg.verify_decode) for i in pending]
    results: dict[int, dict[str, Any]] = {}
    total = sum(len(t.samples) for t in tasks)
    with Progress(total, f"build-shards {cfg.split}") as progress:
        if cfg.workers == 1 or len(tasks) <= 1:
            for task in tasks:
                results[task.index] = write_shard(task)
                progress.update(len(task.samples))
            return results
        context = multiprocessing.get_context("spawn")  # fork is unsafe with s3fs' event loop threads
        with ProcessPoolExecutor(max_workers=min(cfg.workers, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(write_shard, task): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                results[task.index] = future.result()
                progress.update(len(task.samples))
    return results


def _finish(cfg: BuildConfig, plan: ShardPlan, listing: SourceListing, parts: list[dict[str, Any]],
            written: int, kept: int) -> BuildResult:
    rows = [row for part in parts for row in part["rows"]]
    bad = [s for part in parts for s in part["skipped"]]
    report = _report(cfg, listing, rows, bad)
    fs, root = cfg.dst.fs_and_path()
    write_json(fs, f"{root}/{cfg.split}.report.json", report)
    if not rows:
        raise BuildError(f"none of the {len(listing.samples)} image files of {listing.split_dir} is usable; "
                         f"see {cfg.dst.url}/{cfg.split}.report.json")
    fraction = len(bad) / len(listing.samples)
    if fraction > cfg.max_bad:
        raise BuildError(
            f"{len(bad)} of {len(listing.samples)} image files are unusable ({fraction:.1%} > --max-bad "
            f"{cfg.max_bad:.1%}); see {cfg.dst.url}/{cfg.split}.report.json, fix the source or raise --max-bad "
            f"(re-running keeps the shards already written)"
        )
    if read_classes(cfg.dst) is None:
        write_classes(cfg.dst, listing.classes)
    write_manifest(cfg.dst, cfg.split, rows)
    shards = [{"index": p["index"], "name": p["name"], "samples": len(p["rows"]), "bytes": p["bytes"],
               "sha256": p["sha256"]} for p in parts if p["name"] is not None]
    info = {
        "split": cfg.split, "num_samples": len(rows), "num_classes": len(listing.classes),
        "num_shards": len(shards), "fingerprint": fingerprint(listing.classes, rows), "plan": plan.digest,
        "seed": cfg.seed, "manifest": f"{cfg.split}.parquet", "layout": listing.layout, "shards": shards,
        "options": {"shard_bytes": cfg.shard_bytes, "max_shard_samples": cfg.max_shard_samples,
                    "max_side": cfg.max_side, "verify_decode": cfg.verify_decode},
        "report": report["counts"], "created_by": f"distillery {__version__}",
    }
    info = write_info(cfg.dst, info)  # the commit point: readers need this file
    state = build_dir(cfg.dst, cfg.split)
    sfs, sroot = state.fs_and_path()
    if sfs.exists(sroot):
        sfs.rm(sroot, recursive=True)
    parent = sroot.rsplit("/", 1)[0]
    if sfs.isdir(parent) and not sfs.ls(parent):
        sfs.rmdir(parent)
    log.info("split %r: %d samples in %d shards (%d written now, %d kept), %d bad, %d converted; "
             "fingerprint %s", cfg.split, len(rows), len(shards), written, kept, len(bad),
             report["counts"]["converted"], info["fingerprint"][:16])
    return BuildResult(info, report, written, kept)


def _report(cfg: BuildConfig, listing: SourceListing, rows: list[dict[str, Any]],
            bad: list[dict[str, str]]) -> dict[str, Any]:
    converted = [{"source": r["source"], "conversion": r["conversion"]} for r in rows if r["conversion"]]
    kinds = Counter(c for item in converted for c in item["conversion"].split(", "))
    return {
        "split": cfg.split, "src": str(listing.split_dir), "layout": listing.layout,
        "counts": {"image_files": len(listing.samples), "samples": len(rows), "bad": len(bad),
                   "converted": len(converted), "ignored": len(listing.skipped),
                   "empty_classes": len(listing.empty_classes)},
        "conversions": dict(sorted(kinds.items())),
        "bad": bad,
        "converted": converted,
        "ignored": [asdict(s) for s in listing.skipped],
        "empty_classes": listing.empty_classes,
    }

