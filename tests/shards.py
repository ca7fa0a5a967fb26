"""Read built shards back in tests, independently of the pipeline's own reader code."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Any

import pyarrow.parquet as pq


def read_shards(fs: Any, root: str, split: str = "train") -> dict[str, tuple[bytes, int]]:
    """key -> (image bytes, label) over every shard of the split, with plain tarfile."""
    samples: dict[str, tuple[bytes, int]] = {}
    for path in sorted(fs.glob(f"{root}/{split}-*.tar")):
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=io.BytesIO(handle.read())) as tar:
            parts: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, p in parts.items():
            assert key not in samples, f"key {key} in two shards"
            samples[key] = (p["jpg"], int(p["cls"]))
    return samples


def read_manifest_rows(fs: Any, root: str, split: str = "train") -> list[dict[str, Any]]:
    with fs.open(f"{root}/{split}.parquet", "rb") as handle:
        return pq.read_table(handle).to_pylist()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
