"""`pipeline inspect URL`: check built shards against their manifest before spending GPU hours on them.

Reads every shard once (in parallel threads) and checks: the shard exists with the recorded size and
sha256; each member's name, label and content hash match the manifest; each sample has its .jpg and .cls;
counts and the fingerprint agree with the dataset info. Optionally decodes every image (``--decode``).
Never extracts anything: member names are only compared, so a hostile tar cannot write outside a folder;
a member with a path (absolute, ``..`` or folders) or that is not a regular file is reported as a problem.

Damage inside shards becomes a problem in the result, naming the shard and member; damaged metadata
(dataset info, manifest, classes.json) raises `DatasetError` from the readers of `pipeline.manifest`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline.manifest import DatasetError, fingerprint, read_classes, read_info, read_manifest
from pipeline.plan import shard_name
from pipeline.progress import Progress
from pipeline.storage import Location

log = logging.getLogger(__name__)


@dataclass
class InspectResult:
    split: str
    num_samples: int
    num_shards: int
    num_bytes: int
    num_classes: int
    per_class: Counter = field(default_factory=Counter)
    conversions: Counter = field(default_factory=Counter)
    fingerprint: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = sorted(self.per_class.get(i, 0) for i in range(self.num_classes)) or [0]
        lines = [
            f"split {self.split}: {self.num_samples} samples in {self.num_shards} shards, "
            f"{self.num_bytes / 1e6:.1f} MB, {self.num_classes} classes "
            f"(samples per class: min {counts[0]}, max {counts[-1]})",
            f"  fingerprint {self.fingerprint}",
            f"  converted at build time: {dict(self.conversions) or 'none'}",
        ]
        if self.problems:
            lines.append(f"  PROBLEMS ({len(self.problems)}):")
            lines += [f"    - {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"    ... and {len(self.problems) - 50} more")
        else:
            lines.append("  OK: every shard, member, label and hash matches the manifest")
        return "\n".join(lines)


def inspect(dst: Location, split: str = "train", decode: bool = False, threads: int = 4) -> InspectResult:
    info = read_info(dst, split)
    table = read_manifest(dst, split)
    rows = table.to_pylist()
    classes = read_classes(dst) or []
    result = InspectResult(split, len(rows), len(info.shards), sum(s["bytes"] for s in info.shards),
                           len(classes), Counter(r["label"] for r in rows),
                           Counter(r["conversion"] for r in rows if r["conversion"]), info.fingerprint)
    if len(rows) != info.num_samples:
        result.problems.append(f"manifest has {len(rows)} rows, dataset info says {info.num_samples}")
    if fingerprint(classes, rows) != info.fingerprint:
        result.problems.append("fingerprint of manifest + classes differs from the dataset info: "
                               "the manifest or classes.json was changed after the build")
    bad_labels = [i for i, r in enumerate(rows) if not 0 <= r["label"] < len(classes)]
    if bad_labels:
        row = rows[bad_labels[0]]
        result.problems.append(f"{split}.parquet: {len(bad_labels)} labels outside 0..{len(classes) - 1} "
                               f"(classes.json has {len(classes)} classes), e.g. row {bad_labels[0]} "
                               f"(key {row['key']}) has label {row['label']}")
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    with Progress(len(info.shards), f"inspect {split}", unit="shard") as progress, \
            ThreadPoolExecutor(max_workers=threads) as pool:
        for problems in pool.map(lambda s: _check_shard(dst, split, s, by_shard.get(s["index"], []), decode),
                                 info.shards):
            result.problems.extend(problems)
            progress.update(1)
    listed = {s["index"] for s in info.shards}
    orphans = sorted(set(by_shard) - listed)
    if orphans:
        result.problems.append(f"manifest rows point to shards not in the dataset info: {orphans[:5]}")
    return result


def _check_shard(dst: Location, split: str, shard: dict[str, Any], rows: list[dict[str, Any]],
                 decode: bool) -> list[str]:
    name = shard["name"]
    if name != shard_name(split, shard["index"]):
        return [f"{name}: name does not match its index {shard['index']}"]
    fs, root = dst.fs_and_path()
    expected = {r["key"]: r for r in rows}
    seen: set[str] = set()
    problems: list[str] = []
    try:
        with fs.open(f"{root}/{name}", "rb", block_size=8 * 1024 * 1024) as handle:
            reader = _HashingReader(handle)
            try:
                for key, parts in _members(reader, name, problems):
                    row = expected.get(key)
                    if row is None:
                        problems.append(f"{name}: member {key!r} is not in the manifest")
                        continue
                    seen.add(key)
                    problems.extend(_check_sample(name, key, parts, row, decode))
            except (tarfile.TarError, EOFError) as exc:
                return [*problems, f"{name}: not a readable tar ({exc})"]
            reader.drain()
    except FileNotFoundError:
        return [f"{name}: missing"]
    except OSError as exc:
        return [f"{name}: unreadable ({exc})"]
    if reader.count != shard["bytes"]:
        problems.append(f"{name}: {reader.count} bytes, expected {shard['bytes']}")
    if reader.sha.hexdigest() != shard["sha256"]:
        problems.append(f"{name}: sha256 differs from the dataset info (corrupt or replaced)")
    for key in sorted(set(expected) - seen):
        problems.append(f"{name}: sample {key} of the manifest is missing from the shard")
    return problems


class _HashingReader:
    """Sequential reader that hashes and counts every byte it hands out."""

    def __init__(self, raw: Any):
        self.raw, self.sha, self.count = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _members(reader: _HashingReader, shard: str,
             problems: list[str]) -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    """(key, {extension: (data offset, bytes)}) per sample, streamed; nothing is extracted to disk.

    build-shards writes only regular files with flat names; any other member is a problem, not a sample.
    """
    key, parts = None, {}
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                problems.append(f"{shard}: member {info.name!r} is not a regular file (type {info.type!r})")
                continue
            if "/" in info.name or "\\" in info.name or info.name.startswith("."):
                problems.append(f"{shard}: member {info.name!r} has a path (absolute, '..' or folders); "
                                f"shards hold flat names only: never extract this shard")
                continue
            this, _, ext = info.name.partition(".")
            if this != key and key is not None:
                yield key, parts
                parts = {}
            key = this
            parts[ext] = (info.offset_data, tar.extractfile(info).read())
    if key is not None:
        yield key, parts


def _check_sample(shard: str, key: str, parts: dict[str, tuple[int, bytes]], row: dict[str, Any],
                  decode: bool) -> list[str]:
    if "jpg" not in parts or "cls" not in parts:
        return [f"{shard}: sample {key} lacks {'.jpg' if 'jpg' not in parts else '.cls'}"]
    problems = []
    offset, image = parts["jpg"]
    if hashlib.sha256(image).hexdigest() != row["sha256"]:
        problems.append(f"{shard}: {key}.jpg content differs from the manifest hash")
    if offset != row["offset"] or len(image) != row["size"]:
        problems.append(f"{shard}: {key}.jpg offset/size differ from the manifest")
    label_text = parts["cls"][1].decode("ascii", "replace").strip()
    if label_text != str(row["label"]):
        problems.append(f"{shard}: {key}.cls says {label_text!r}, manifest says {row['label']}")
    if decode:
        try:
            with Image.open(io.BytesIO(image)) as img:
                img.load()
                if img.size != (row["width"], row["height"]):
                    problems.append(f"{shard}: {key}.jpg is {img.size}, manifest says "
                                    f"{(row['width'], row['height'])}")
        except Exception as exc:  # noqa: BLE001 - any decode failure is a finding, not a crash
            problems.append(f"{shard}: {key}.jpg does not decode ({exc})")
    return problems


__all__ = ["DatasetError", "InspectResult", "inspect"]
