"""What a built split is: its manifest (one row per sample), its dataset info and its fingerprint.

Files of a split ``S`` in the destination folder::

    S-000000.tar ...        WebDataset shards: <key>.jpg (image bytes) and <key>.cls (label, ASCII digits)
    S.parquet               manifest, one row per sample in shard order (columns: MANIFEST_SCHEMA)
    S.dataset.json          dataset info: format version, counts, shards (+ sha256), fingerprint, options
    S.report.json           build report: skipped files with reasons, conversions, empty classes
    classes.json            class index <-> class name (wnid), shared by all splits

The fingerprint hashes the classes and, in shard order, every sample's key, label, shard and content
hash. Every later stage (stream, teacher cache, checkpoints) records it and refuses a mismatch.

The readers raise `DatasetError`, naming the file and what to do, for anything missing, damaged (not
JSON or not parquet, bytes that are not UTF-8), of another format or version, or holding values no build
writes (a field of the wrong type, a label outside the classes, a shard name that is a path). Only errors
of the storage itself (`OSError`: unreachable store, permission denied) pass through as they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.plan import shard_glob
from pipeline.storage import Location, exists, write_bytes, write_json

FORMAT = "distillery-shards"
FORMAT_VERSION = 1

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("label", pa.int32()),
    ("source", pa.string()),  # path relative to the split folder of --src
    ("shard", pa.int32()),
    ("offset", pa.int64()),  # byte offset of the image data inside the shard
    ("size", pa.int64()),  # bytes of the stored image
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sha256", pa.string()),  # of the stored bytes
    ("conversion", pa.string()),  # "" when stored as is
])


class DatasetError(ValueError):
    """A built split is missing, incomplete, of an unknown format or inconsistent; the message says which."""


@dataclass(frozen=True)
class DatasetInfo:
    split: str
    num_samples: int
    num_classes: int
    fingerprint: str
    shards: list[dict[str, Any]]  # name, samples, bytes, sha256
    raw: dict[str, Any]

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.shards]


def fingerprint(classes: list[str], rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\n".encode())
    h.update("\n".join(classes).encode())
    for r in rows:
        h.update(f"\n{r['key']}\t{r['label']}\t{r['shard']}\t{r['sha256']}".encode())
    return h.hexdigest()


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_manifest(dst: Location, split: str, rows: list[dict[str, Any]]) -> None:
    buffer = io.BytesIO()
    pq.write_table(manifest_table(rows), buffer, compression="zstd")
    fs, root = dst.fs_and_path()
    write_bytes(fs, f"{root}/{split}.parquet", buffer.getvalue())


def read_manifest(dst: Location, split: str) -> pa.Table:
    """The manifest with exactly `MANIFEST_SCHEMA`'s columns and types, and no empty values."""
    fs, root = dst.fs_and_path()
    path = f"{root}/{split}.parquet"
    where = f"{dst.url}/{split}.parquet"
    if not exists(fs, path):
        raise DatasetError(f"{dst.url}: no manifest {split}.parquet; run `pipeline build-shards` first")
    with fs.open(path, "rb") as handle:
        data = handle.read()
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:  # pyarrow reports bad bytes as OSError too
        raise DatasetError(f"{where}: not a readable parquet manifest ({type(exc).__name__}: {exc}); "
                           f"the file is damaged: rebuild the split (`pipeline build-shards --overwrite`)") from None
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DatasetError(f"{where}: columns {sorted(missing)} missing; rebuild the split")
    try:
        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise DatasetError(f"{where}: columns of unexpected types ({exc}); rebuild the split") from None
    empty = [name for name in MANIFEST_SCHEMA.names if table.column(name).null_count]
    if empty:
        raise DatasetError(f"{where}: empty values in columns {empty}; the file is damaged: rebuild the split")
    return table


def check_manifest(table: pa.Table, dst: Location, info: DatasetInfo) -> None:
    """Refuse manifest rows no build writes, before any shard is read (vectorised: cheap at 1.3M rows).

    A label must index ``classes.json``; a row's shard must be listed in the dataset info; its image must
    start on a tar block boundary after the member's header and be non-empty.
    """
    where = f"{dst.url}/{info.split}.parquet"
    classes = read_classes(dst)
    num_classes = info.num_classes if classes is None else len(classes)
    if classes is not None and len(classes) != info.num_classes:
        raise DatasetError(f"{dst.url}/classes.json lists {len(classes)} classes, {info.split}.dataset.json "
                           f"says {info.num_classes}: they come from different builds; rebuild the split")
    labels = table.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise DatasetError(
            f"{where}: {len(bad)} rows have a label outside 0..{num_classes - 1} (classes.json has "
            f"{num_classes} classes), e.g. row {row} (key {table.column('key')[row].as_py()}) has label "
            f"{labels[row]}; the manifest or classes.json was edited or they belong to different builds: "
            f"rebuild the split")
    shards = table.column("shard").to_numpy()
    unknown = np.setdiff1d(np.unique(shards), np.asarray([s["index"] for s in info.shards], dtype=np.int64))
    if len(unknown):
        row = int(np.flatnonzero(shards == unknown[0])[0])
        raise DatasetError(f"{where}: row {row} (key {table.column('key')[row].as_py()}) is in shard "
                           f"{unknown[0]}, which {info.split}.dataset.json does not list; rebuild the split")
    offsets, sizes = table.column("offset").to_numpy(), table.column("size").to_numpy()
    block = tarfile.BLOCKSIZE
    bad = np.flatnonzero((offsets < block) | (offsets % block != 0) | (sizes < 1))
    if len(bad):
        row = int(bad[0])
        raise DatasetError(f"{where}: row {row} (key {table.column('key')[row].as_py()}) has offset "
                           f"{offsets[row]} and size {sizes[row]}, which no tar member has; rebuild the split")


def write_classes(dst: Location, classes: list[str]) -> None:
    fs, root = dst.fs_and_path()
    write_json(fs, f"{root}/classes.json",
               {"format": FORMAT, "version": FORMAT_VERSION, "classes": classes})


def read_classes(dst: Location) -> list[str] | None:
    fs, root = dst.fs_and_path()
    path = f"{root}/classes.json"
    if not exists(fs, path):
        return None
    where = f"{dst.url}/classes.json"
    value = _read_json(fs, path, where)
    _check_version(value, where)
    classes = value.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{where}: 'classes' is not a list of class names; the file is damaged: restore it "
                           f"or rebuild the shards")
    return list(classes)


def write_info(dst: Location, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``S.dataset.json`` (format and version first) and return what was written."""
    value = {"format": FORMAT, "version": FORMAT_VERSION, **info}
    fs, root = dst.fs_and_path()
    write_json(fs, f"{root}/{info['split']}.dataset.json", value)
    return value


def read_info(dst: Location, split: str) -> DatasetInfo:
    fs, root = dst.fs_and_path()
    path = f"{root}/{split}.dataset.json"
    if not exists(fs, path):
        raise DatasetError(_why_not_built(fs, root, dst.url, split))
    where = f"{dst.url}/{split}.dataset.json"
    value = _read_json(fs, path, where)
    _check_version(value, where)
    _check_fields(value, _INFO_FIELDS, where)
    for shard in value["shards"]:
        _check_fields(shard, _SHARD_FIELDS, f"{where}: a shard entry")
        name = shard["name"]
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tar"):
            raise DatasetError(f"{where}: shard name {name!r} is not a plain .tar file name; {_DAMAGED}")
    if len({s["index"] for s in value["shards"]}) != len(value["shards"]):
        raise DatasetError(f"{where}: two shard entries have the same index; {_DAMAGED}")
    return DatasetInfo(split, value["num_samples"], value["num_classes"], value["fingerprint"],
                       value["shards"], value)


def _why_not_built(fs: Any, root: str, url: str, split: str) -> str:
    """Say what is at ``url`` instead of the split: nothing at all (a typo, a missing bucket, no access), a
    build of the split that has not finished, or other splits (the wrong ``--split``)."""
    build = f"`pipeline build-shards --src FOLDER --dst {url} --split {split}`"

    def listed(pattern: str) -> list[str] | None:
        try:
            return fs.glob(f"{root}/{pattern}")
        except (OSError, ValueError):  # e.g. no permission to list: say only what is known
            return None

    try:
        there = fs.exists(root)
    except (OSError, ValueError):
        there = True
    if not there:
        return (f"{url}: nothing is there (no such folder or bucket, or no access to it): check the URL and the "
                f"storage options, or build the split there with {build}")
    if listed(shard_glob(split)):
        return (f"{url}: the build of split {split!r} has not finished (shards are there, {split}.dataset.json "
                f"is not): rerun the same {build} and it resumes")
    built = sorted(posixpath.basename(p)[:-len(".dataset.json")] for p in listed("*.dataset.json") or [])
    if built:
        return (f"{url}: split {split!r} is not built (no {split}.dataset.json); the splits there are "
                f"{', '.join(built)}: choose one of them, or run {build}")
    return f"{url}: split {split!r} is not built (no {split}.dataset.json); run {build}"


_DAMAGED = "the file is damaged or was edited: rebuild the split (`pipeline build-shards --overwrite`)"
_INFO_FIELDS = {"num_samples": int, "num_classes": int, "fingerprint": str, "shards": list}
_SHARD_FIELDS = {"index": int, "name": str, "bytes": int, "sha256": str}
_KINDS = {int: "a non-negative integer", str: "a string", list: "a list"}


def _read_json(fs: Any, path: str, where: str) -> Any:
    with fs.open(path, "rb") as handle:
        data = handle.read()
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested beyond reason
        raise DatasetError(f"{where}: not a valid JSON file ({type(exc).__name__}: {exc}); {_DAMAGED}") from None


def _check_fields(value: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: not a JSON object; {_DAMAGED}")
    for name, kind in fields.items():
        field = value.get(name)
        if not isinstance(field, kind) or isinstance(field, bool) or (kind is int and field < 0):
            found = "missing" if name not in value else f"{field!r}"[:40]
            raise DatasetError(f"{where}: field {name!r} is {found}, expected {_KINDS[kind]}; {_DAMAGED}")


def _check_version(value: Any, where: str) -> None:
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise DatasetError(f"{where}: not a {FORMAT} file (no \"format\": \"{FORMAT}\"); {_DAMAGED}")
    if value.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{where}: format version {value.get('version')} is not understood by this code "
            f"(reads version {FORMAT_VERSION}); rebuild the shards or upgrade distillery"
        )
