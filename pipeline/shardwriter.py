"""Write one shard of the plan: read its source files, check/convert them, stream them into a tar.

This runs in a worker process, one call per shard. The tar is written with fixed metadata (mtime 0, uid
0, mode 0444), so the same plan gives byte-identical shards; it is committed atomically, and only then is
the shard's part file (its manifest rows and skipped files) written: a part file marks a complete shard.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Any

from pipeline.images import BadImage, prepare_image
from pipeline.plan import PlannedSample, shard_name
from pipeline.sources import display_path
from pipeline.storage import Location, atomic_write, write_json


@dataclass(frozen=True)
class ShardTask:
    dst: Location
    split: str
    index: int
    samples: tuple[PlannedSample, ...]
    src_dir: str
    plan_digest: str
    max_side: int | None = None
    verify_decode: bool = False


class _HashingWriter:
    """File-like object that forwards writes and keeps a running sha256 and byte count."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info


def build_dir(dst: Location, split: str) -> Location:
    """Where a build in progress keeps its plan and per-shard part files (removed when it completes)."""
    return dst.child("_build", split)


def part_name(split: str, index: int) -> str:
    return shard_name(split, index).replace(".tar", ".json")


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write shard ``task.index``; returns (and persists) its part: rows, skipped files, size, sha256."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    prepared = []
    for sample in task.samples:
        source = display_path(sample.relpath)
        try:
            with open(os.path.join(task.src_dir, sample.relpath), "rb") as handle:
                data = handle.read()
            prepared.append((sample, prepare_image(data, task.max_side, task.verify_decode)))
        except BadImage as exc:
            skipped.append({"source": source, "reason": str(exc)})
        except OSError as exc:
            skipped.append({"source": source, "reason": f"cannot read: {exc.strerror or exc}"})
    fs, root = task.dst.fs_and_path()
    name = shard_name(task.split, task.index)
    digest, nbytes = "", 0
    if prepared:
        with atomic_write(fs, f"{root}/{name}") as raw:
            out = _HashingWriter(raw)
            with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample, image in prepared:
                    tar.addfile(_member(f"{sample.key}.jpg", len(image.data)), io.BytesIO(image.data))
                    data_offset = tar.offset - _padded(len(image.data))
                    label = str(sample.label).encode()
                    tar.addfile(_member(f"{sample.key}.cls", len(label)), io.BytesIO(label))
                    rows.append({
                        "key": sample.key, "label": sample.label, "source": display_path(sample.relpath),
                        "shard": task.index, "offset": data_offset, "size": len(image.data),
                        "width": image.width, "height": image.height,
                        "sha256": hashlib.sha256(image.data).hexdigest(), "conversion": image.conversion,
                    })
            digest, nbytes = out.sha.hexdigest(), out.count
    part = {"plan": task.plan_digest, "index": task.index, "name": name if prepared else None,
            "bytes": nbytes, "sha256": digest, "rows": rows, "skipped": skipped}
    parts = build_dir(task.dst, task.split)
    pfs, proot = parts.fs_and_path()
    write_json(pfs, f"{proot}/{part_name(task.split, task.index)}", part)
    return part


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
