"""The teacher cache on any fsspec URL: one parquet file per dataset shard, plus ``cache.json``.

::

    cache.json                      format, version, dataset fingerprint, teacher identity, map size, k,
                                    shards done, bytes per image (written last: the commit point)
    train-000000.parquet ...        key, indices (int16 [h*w*k]), values (float16 [h*w*k]),
                                    floor (float16 [h*w]) per image, in the shard's manifest order

A training run opens it with the dataset and teacher it expects; any difference (data, teacher name,
weights, resolution) is refused with a message that says which.
"""

from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.storage import Location, exists, read_json, write_bytes, write_json
from pipeline.stream import ShardSet
from pipeline.transfer import to_device
from teacher_cache.maps import EncodedMaps, box_weights, pooled_logits

log = logging.getLogger(__name__)

FORMAT = "distillery-teacher-cache"
FORMAT_VERSION = 1
SCHEMA = pa.schema([("key", pa.string()), ("indices", pa.binary()), ("values", pa.binary()), ("floor", pa.binary())])


class CacheMismatch(ValueError):
    """The cache was built for other data or another teacher; the message says which and what to do."""


def part_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.parquet"


def write_part(out: Location, split: str, shard: int, keys: list[str], maps: EncodedMaps,
               meta: dict[str, Any]) -> int:
    """Write one shard's encoded maps atomically, with ``meta`` (dataset, teacher, map size) in the parquet
    footer, so a resumed build can tell a finished part of the same build from anything else."""
    table = pa.Table.from_pydict({
        "key": keys,
        "indices": [m.tobytes() for m in maps.indices],
        "values": [m.tobytes() for m in maps.values],
        "floor": [m.tobytes() for m in maps.floor],
    }, schema=SCHEMA.with_metadata({b"distillery": json.dumps(meta).encode()}))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    fs, root = out.fs_and_path()
    write_bytes(fs, f"{root}/{part_name(split, shard)}", buffer.getvalue())
    return buffer.tell()


def read_part_meta(out: Location, split: str, shard: int) -> dict[str, Any] | None:
    """The footer metadata of a finished part, or None when the part is absent or unreadable."""
    fs, root = out.fs_and_path()
    path = f"{root}/{part_name(split, shard)}"
    if not exists(fs, path):
        return None
    try:
        with fs.open(path, "rb") as handle:
            meta = pq.read_schema(handle).metadata or {}
        return {**json.loads(meta[b"distillery"]), "bytes": fs.size(path)}
    except Exception:  # noqa: BLE001 - a damaged part is simply redone
        return None


def write_info(out: Location, info: dict[str, Any]) -> None:
    fs, root = out.fs_and_path()
    write_json(fs, f"{root}/cache.json", {"format": FORMAT, "version": FORMAT_VERSION, **info})


def read_info(out: Location) -> dict[str, Any] | None:
    fs, root = out.fs_and_path()
    if not exists(fs, f"{root}/cache.json"):
        return None
    info = read_json(fs, f"{root}/cache.json")
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise CacheMismatch(f"{out.url}/cache.json: format {info.get('format')} v{info.get('version')} is not "
                            f"understood (this code reads {FORMAT} v{FORMAT_VERSION}); rebuild the cache")
    return info


def check_identity(url: str, info: dict[str, Any], fingerprint: str, teacher: dict[str, Any] | None) -> None:
    if info["dataset"]["fingerprint"] != fingerprint:
        raise CacheMismatch(
            f"teacher cache {url} was built for dataset {info['dataset']['fingerprint'][:16]}, this run trains on "
            f"{fingerprint[:16]}: rebuild it with `teacher-cache build` on these shards, or use distill.source=online")
    for field in ("name", "weights_sha256", "resolution", "num_classes"):
        if teacher is not None and teacher.get(field) is not None and info["teacher"].get(field) != teacher[field]:
            raise CacheMismatch(
                f"teacher cache {url} holds teacher {field}={info['teacher'].get(field)!r}, this run asks for "
                f"{teacher[field]!r}: rebuild the cache for this teacher, or point distill.cache at the right one")


@dataclass
class _Part:
    indices: np.ndarray
    values: np.ndarray
    floor: np.ndarray


class TeacherCache:
    """Cached teacher logits for training views: ``logits(rows, boxes)`` -> [B, C] on any device."""

    def __init__(self, location: Location, shards: ShardSet, teacher: dict[str, Any] | None = None,
                 max_parts_in_memory: int = 16):
        info = read_info(location)
        if info is None:
            raise CacheMismatch(f"{location.url}: no complete teacher cache (no cache.json); run "
                                f"`teacher-cache build` (a build that stopped half-way resumes)")
        check_identity(location.url, info, shards.fingerprint, teacher)
        self.location, self.shards, self.info = location, shards, info
        self.height, self.width, self.k = info["map"]["height"], info["map"]["width"], info["map"]["k"]
        self.classes = info["teacher"]["num_classes"]
        self._parts: OrderedDict[int, _Part] = OrderedDict()
        self._max_parts = max_parts_in_memory

    def _part(self, shard: int) -> _Part:
        if shard in self._parts:
            self._parts.move_to_end(shard)
            return self._parts[shard]
        fs, root = self.location.fs_and_path()
        with fs.open(f"{root}/{part_name(self.shards.split, shard)}", "rb") as handle:
            table = pq.read_table(handle)
        cells = self.height * self.width
        n = table.num_rows
        join = lambda name, dtype: np.frombuffer(b"".join(table.column(name).to_pylist()), dtype=dtype)  # noqa: E731
        part = _Part(join("indices", np.int16).reshape(n, cells, self.k),
                     join("values", np.float16).reshape(n, cells, self.k), join("floor", np.float16).reshape(n, cells))
        self._parts[shard] = part
        if len(self._parts) > self._max_parts:
            self._parts.popitem(last=False)
        return part

    def logits(self, rows: np.ndarray, boxes: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """The cached teacher's scores for views of manifest ``rows`` cropped at relative ``boxes``."""
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = self.shards.shards[rows]
        position = rows - self.shards.shard_starts[shard_of]
        cells = self.height * self.width
        indices = np.empty((len(rows), cells, self.k), np.int16)
        values = np.empty((len(rows), cells, self.k), np.float16)
        floor = np.empty((len(rows), cells), np.float16)  # ~2 MB a DeiT step at 7x7, k=10: to_device pins
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            part = self._part(int(shard))
            indices[mask], values[mask], floor[mask] = (part.indices[position[mask]], part.values[position[mask]],
                                                        part.floor[position[mask]])
        weights = box_weights(to_device(boxes, device).float(), self.height, self.width)
        return pooled_logits(to_device(indices, device), to_device(values, device), to_device(floor, device),
                             weights, self.classes)
