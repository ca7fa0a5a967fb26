"""What a built split is: its manifest (one row per sample), its dataset info and its fingerprint.

Files of a split ``S`` in the destination folder::

    S-000000.tar ...        WebDataset shards: <key>.jpg (image bytes) and <key>.cls (label, ASCII digits)
    S.parquet               manifest, one row per sample in shard order (columns: MANIFEST_SCHEMA)
    S.dataset.json          dataset info: format version, counts, shards (+ sha256), fingerprint, options
    S.report.json           build report: skipped files with reasons, conversions, empty classes
    classes.json            class index <-> class name (wnid), shared by all splits

The fingerprint hashes the classes and, in shard order, every sample's key, label, shard and content
hash. Every later stage (stream, teacher cache, checkpoints) records it and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Location, exists, read_json, write_bytes, write_json

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
    fs, root = dst.fs_and_path()
    path = f"{root}/{split}.parquet"
    if not exists(fs, path):
        raise DatasetError(f"{dst.url}: no manifest {split}.parquet; run `pipeline build-shards` first")
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    missing = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DatasetError(f"{dst.url}/{split}.parquet: columns {sorted(missing)} missing; rebuild the split")
    return table


def write_classes(dst: Location, classes: list[str]) -> None:
    fs, root = dst.fs_and_path()
    write_json(fs, f"{root}/classes.json",
               {"format": FORMAT, "version": FORMAT_VERSION, "classes": classes})


def read_classes(dst: Location) -> list[str] | None:
    fs, root = dst.fs_and_path()
    path = f"{root}/classes.json"
    if not exists(fs, path):
        return None
    value = read_json(fs, path)
    _check_version(value, f"{dst.url}/classes.json")
    return list(value["classes"])


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
        raise DatasetError(
            f"{dst.url}: split {split!r} is not built (no {split}.dataset.json); "
            f"run `pipeline build-shards --split {split}` (a build that stopped half-way resumes)"
        )
    value = read_json(fs, path)
    _check_version(value, f"{dst.url}/{split}.dataset.json")
    return DatasetInfo(split, value["num_samples"], value["num_classes"], value["fingerprint"],
                       value["shards"], value)


def _check_version(value: Any, where: str) -> None:
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise DatasetError(f"{where}: not a {FORMAT} file")
    if value.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{where}: format version {value.get('version')} is not understood by this code "
            f"(reads version {FORMAT_VERSION}); rebuild the shards or upgrade distillery"
        )
