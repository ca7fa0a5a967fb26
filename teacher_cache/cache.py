"""The teacher cache on any fsspec URL: one parquet file per dataset shard, plus ``cache.json``.

::

    cache.json                      format, version, dataset fingerprint, teacher identity, map size, k,
                                    replayed views (or null), shards done, bytes per image (written last:
                                    the commit point)
    train-000000.parquet ...        key, indices (int16 [cells*k]), values (float16 [cells*k]),
                                    floor (float16 [cells]) per image, in the shard's manifest order

A cell is a location of the image's logit map (h*w of them), or in a replay cache one of the image's R
fixed crops (`pipeline.views.replayed_views`), whose teacher output it holds exactly (up to top-k).
A training run opens it with the dataset and teacher it expects; any difference (data, teacher name,
weights, resolution, and for a replay cache the crops) is refused with a message that says which.
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

from pipeline.config import AugmentConfig
from pipeline.storage import Location, exists, read_json, write_bytes, write_json
from pipeline.stream import ShardSet
from pipeline.transfer import to_device
from teacher_cache.maps import EncodedMaps, box_weights, pooled_logits

log = logging.getLogger(__name__)

FORMAT = "distillery-teacher-cache"
FORMAT_VERSION = 2  # 2: a replay cache ("views"); map caches are still written and read as version 1
READABLE_VERSIONS = (1, 2)
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
    """``cache.json``; a map cache stays version 1, which older code reads too."""
    fs, root = out.fs_and_path()
    write_json(fs, f"{root}/cache.json", {"format": FORMAT, "version": FORMAT_VERSION if info.get("views") else 1,
                                          **info})


def read_info(out: Location) -> dict[str, Any] | None:
    fs, root = out.fs_and_path()
    if not exists(fs, f"{root}/cache.json"):
        return None
    info = read_json(fs, f"{root}/cache.json")
    if info.get("format") != FORMAT or info.get("version") not in READABLE_VERSIONS:
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
                f"{teacher[field]!r}: rebuild the cache for this teacher, or point distill.cache_url at the right one")


# What cuts a replay cache's crops (per crop mode) and what the teacher saw of them (mean, std). Raise
# REPLAY_ALGORITHM with any change to how pipeline.views draws or KeyedUniforms hashes: older caches hold
# the teacher's outputs on other crops and are then refused, not served.
REPLAY_FIELDS = {"rrc": ("image_size", "scale", "ratio", "hflip", "interpolation", "mean", "std"),
                 "simple": ("image_size", "crop_pad", "hflip", "interpolation", "mean", "std")}
REPLAY_ALGORITHM = 1


def replay_identity(augment: AugmentConfig, views: int, seed: int) -> dict[str, Any] | None:
    """What fixes a replay cache's crops: their count, seed, the drawing code's version and the
    augmentation fields that cut them; None for a map cache (``views=0``)."""
    if not views:
        return None
    fields = {name: getattr(augment, name) for name in REPLAY_FIELDS[augment.crop]}
    return {"count": views, "seed": seed, "algorithm": REPLAY_ALGORITHM, "crop": augment.crop,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def check_replay(url: str, stored: dict[str, Any] | None, augment: AugmentConfig, views: int, seed: int) -> None:
    """Refuse a replay cache whose crops are not the ones ``views``, ``seed`` and ``augment`` cut (and
    a map cache where a replay one is asked for, and the other way round), naming the field."""
    wanted = replay_identity(augment, views, seed)
    if stored == wanted:
        return
    if stored is None or wanted is None:
        if stored:
            raise CacheMismatch(f"teacher cache {url} replays {stored['count']} fixed crops per image (seed "
                                f"{stored['seed']}), this run draws fresh crops: set data.augment.replay_views="
                                f"{stored['count']} data.augment.replay_seed={stored['seed']}")
        raise CacheMismatch(f"teacher cache {url} holds logit maps, this run replays crops: set "
                            f"data.augment.replay_views=0, or build a replay cache (teacher-cache build --views R)")
    field = next(k for k in [*wanted, *stored] if stored.get(k) != wanted.get(k))
    if field == "algorithm":
        raise CacheMismatch(f"teacher cache {url} replays crops drawn by version {stored.get(field)} of the crop "
                            f"drawing, this code draws version {wanted[field]}: rebuild the cache")
    name = {"count": "augment.replay_views", "seed": "augment.replay_seed"}.get(field, f"augment.{field}")
    raise CacheMismatch(f"teacher cache {url} replays crops cut with {field}={stored.get(field)!r}, this run cuts them "
                        f"with {name}={wanted.get(field)!r}: set it to the cache's value, or rebuild the cache")


# parsed parts a TeacherCache keeps (per process): ImageNet's whole cache at a 7x7 map, top-10, is ~2.6 GB
MEMORY_BUDGET = 4 << 30


@dataclass
class _Part:
    indices: np.ndarray
    values: np.ndarray
    floor: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.indices.nbytes + self.values.nbytes + self.floor.nbytes


def _fixed_width(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    """Binary column ``name``, whose values all have one length, as one flat array over Arrow's own buffer
    (no Python bytes object per row, no join)."""
    values = table.column(name).combine_chunks()
    if not pa.types.is_binary(values.type):  # int32 offsets below; large_binary (int64) or another type
        values = values.cast(pa.binary())
    if len(values) == 0:
        return np.empty(0, dtype)
    if values.null_count:
        raise CacheMismatch(f"a teacher cache part has {values.null_count} empty {name!r} values: "
                            f"rebuild the cache")
    offsets = np.frombuffer(values.buffers()[1], np.int32, count=len(values) + 1, offset=4 * values.offset)
    start, end = int(offsets[0]), int(offsets[-1])
    return np.frombuffer(values.buffers()[2], dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=start)


class TeacherCache:
    """Cached teacher logits for training views: ``logits(rows, boxes)`` -> [B, C] on any device. Each part
    (one shard's logits) is read once and kept while the parts kept fit ``max_bytes_in_memory``; past it
    the least recently used go (a budget smaller than the parts a step's batch spans re-reads parts at
    every step, which ``parts_read`` shows and a warning says)."""

    def __init__(self, location: Location, shards: ShardSet, teacher: dict[str, Any] | None = None,
                 max_bytes_in_memory: int = MEMORY_BUDGET, augment: AugmentConfig | None = None):
        """``augment``: the run's augmentation, whose replay settings must be the cache's (None: unchecked)."""
        info = read_info(location)
        if info is None:
            raise CacheMismatch(f"{location.url}: no complete teacher cache (no cache.json); run "
                                f"`teacher-cache build` (a build that stopped half-way resumes)")
        check_identity(location.url, info, shards.fingerprint, teacher)
        self.views: dict[str, Any] | None = info.get("views")
        if augment is not None:
            check_replay(location.url, self.views, augment, augment.replay_views, augment.replay_seed)
        self.location, self.shards, self.info = location, shards, info
        self.height, self.width, self.k = info["map"]["height"], info["map"]["width"], info["map"]["k"]
        self.cells = self.views["count"] if self.views else self.height * self.width
        self.classes = info["teacher"]["num_classes"]
        self._parts: OrderedDict[int, _Part] = OrderedDict()
        self._budget = max_bytes_in_memory
        self._bytes = 0  # of the parts kept
        self.parts_read = 0  # part files read and parsed (a part dropped and needed again counts again)
        self._dropped = False

    def _part(self, shard: int) -> _Part:
        if shard in self._parts:
            self._parts.move_to_end(shard)
            return self._parts[shard]
        fs, root = self.location.fs_and_path()
        with fs.open(f"{root}/{part_name(self.shards.split, shard)}", "rb") as handle:
            table = pq.read_table(handle)
        cells = self.cells
        n = table.num_rows
        part = _Part(_fixed_width(table, "indices", np.int16).reshape(n, cells, self.k),
                     _fixed_width(table, "values", np.float16).reshape(n, cells, self.k),
                     _fixed_width(table, "floor", np.float16).reshape(n, cells))
        self.parts_read += 1
        self._parts[shard] = part
        self._bytes += part.nbytes
        while self._bytes > self._budget and len(self._parts) > 1:
            _, dropped = self._parts.popitem(last=False)
            self._bytes -= dropped.nbytes
            if not self._dropped:
                self._dropped = True
                log.warning("teacher cache %s: its parts outgrow max_bytes_in_memory=%d, so parts are read again "
                            "when needed again (slow if a step's batch spans more of them than fit)",
                            self.location.url, self._budget)
        return part

    def logits(self, rows: np.ndarray, boxes: torch.Tensor, device: str | torch.device = "cpu",
               view_ids: np.ndarray | None = None) -> torch.Tensor:
        """The cached teacher's scores for views of manifest ``rows`` cropped at relative ``boxes``: the map
        pooled over the box, or, from a replay cache, the stored output of crop ``view_ids`` (the loader's
        `Batch.view_ids`)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.views and view_ids is None:
            raise ValueError(f"teacher cache {self.location.url} replays fixed crops: pass the batch's view_ids "
                             f"(a loader with data.augment.replay_views={self.views['count']})")
        shard_of = self.shards.shards[rows]
        position = rows - self.shards.shard_starts[shard_of]
        views = None if not self.views else np.asarray(view_ids, dtype=np.int64)
        used = 1 if self.views else self.cells  # a replay cache: only the view's own cell goes to the device
        indices = np.empty((len(rows), used, self.k), np.int16)
        values = np.empty((len(rows), used, self.k), np.float16)
        floor = np.empty((len(rows), used), np.float16)  # ~2 MB a DeiT step at 7x7, k=10: to_device pins
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            part = self._part(int(shard))
            # a replay cache: [m, 1] images and cells -> [m, 1, k] and [m, 1]
            at = position[mask] if views is None else (position[mask][:, None], views[mask][:, None])
            indices[mask], values[mask], floor[mask] = part.indices[at], part.values[at], part.floor[at]
        if self.views:
            weights = torch.ones(len(rows), 1, device=device)
        else:
            weights = box_weights(to_device(boxes, device).float(), self.height, self.width)
        return pooled_logits(to_device(indices, device), to_device(values, device), to_device(floor, device),
                             weights, self.classes)
