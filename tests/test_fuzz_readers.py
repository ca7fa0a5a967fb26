"""The readers of a built split never crash on damaged files: random and mutated bytes (hypothesis, a bounded
number of examples) give the documented errors (`DatasetError`) or, for shard bytes, skipped-and-counted
samples and `pipeline inspect` problems, never a raw KeyError, ArrowInvalid or UnicodeDecodeError.

``FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_readers.py`` searches longer than the default few seconds.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.build import BuildConfig, build_shards
from pipeline.config import StreamConfig
from pipeline.images import BadImage, prepare_image
from pipeline.inspect import inspect
from pipeline.manifest import MANIFEST_SCHEMA, DatasetError, read_classes, read_info, read_manifest
from pipeline.storage import Location
from pipeline.stream import PieceReader, ShardSet, StreamMetrics
from pipeline.synthetic import jpeg_bytes
from tests.imagetree import make_tree

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


TAR_FIELDS = [(0, 100), (100, 8), (124, 12), (156, 1), (157, 100), (257, 8), (345, 155)]  # name, mode,
TYPEFLAGS = b"0125xgLKS\0"  # size, type, link name, magic, prefix: what a tar reader parses


@st.composite
def mutated(draw: st.DrawFn, original: bytes, headers: tuple[int, ...] = ()) -> bytes:
    """``original`` with a few bytes flipped, cut, inserted or removed; with ``headers`` (offsets of tar
    headers) also header fields rewritten with a valid checksum, so the tar reader parses them."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "flip", "cut", "insert", "delete"] + ["header"] * 3 * bool(headers)))
        if kind == "header":
            block = draw(st.sampled_from(headers))
            start, width = draw(st.sampled_from(TAR_FIELDS))
            if width == 1:
                value = bytes([draw(st.sampled_from(TYPEFLAGS))])
            else:
                value = draw(st.binary(max_size=width) | st.sampled_from(
                    [b"../evil.jpg", b"/abs.jpg", b"a/b.jpg", b"99999999999", b"-1", b"ustar\x0000"]))
            value = value[:width].ljust(width, b"\0")
            if block + 512 <= len(data):
                data[block + start:block + start + width] = value
                data[block + 148:block + 156] = b" " * 8
                data[block + 148:block + 156] = b"%06o\0 " % sum(data[block:block + 512])
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def edited(draw: st.DrawFn, original: dict[str, Any]) -> dict[str, Any]:
    """``original`` with some keys dropped or replaced by arbitrary JSON (also one level down in lists)."""
    value = dict(original)
    for name in draw(st.lists(st.sampled_from(sorted(original)), min_size=1, max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "replace", "inner"]))
        if action == "drop":
            del value[name]
        elif action == "inner" and isinstance(value[name], list) and value[name]:
            items = list(value[name])
            i = draw(st.integers(0, len(items) - 1))
            if isinstance(items[i], dict) and items[i]:
                items[i] = draw(edited(items[i]))
            else:
                items[i] = draw(json_values)
            value[name] = items
        else:
            value[name] = draw(json_values)
    return value


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small clean split (3 shards) whose files the tests copy and damage."""
    root = tmp_path_factory.mktemp("fuzz")
    tree = make_tree(root / "src", num_classes=3, per_class=4, defects=False, size_range=(24, 48))
    build_shards(BuildConfig(src=str(tree.root), dst=Location(str(root / "good")), shard_bytes=12_000, workers=1))
    return root / "good"


@pytest.fixture(scope="module")
def work(good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the good split that each example overwrites one file of (and restores afterwards)."""
    target = tmp_path_factory.mktemp("fuzz-work") / "dst"
    shutil.copytree(good, target)
    return target


def _with(work: Path, good: Path, name: str, data: bytes):
    """Replace ``name`` in the work copy by ``data``; returns a function that puts the good file back."""
    (work / name).write_bytes(data)
    return lambda: shutil.copyfile(good / name, work / name)


def _open_all(dst: Path) -> None:
    """Every reader of the split metadata, as the stream and `pipeline inspect` call them."""
    location = Location(str(dst))
    info = read_info(location, "train")
    assert isinstance(info.num_samples, int) and isinstance(info.fingerprint, str)
    assert all(isinstance(s["name"], str) and isinstance(s["index"], int) for s in info.shards)
    classes = read_classes(location)
    assert classes is None or all(isinstance(c, str) for c in classes)
    read_manifest(location, "train")
    ShardSet.open(location, "train")
    inspect(location, threads=1)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_dataset_info(good: Path, work: Path, data: bytes) -> None:
    restore = _with(work, good, "train.dataset.json", data)
    try:
        with pytest.raises(DatasetError, match="train.dataset.json"):
            read_info(Location(str(work)), "train")
    finally:
        restore()


@FUZZ
@given(data=st.data())
def test_edited_dataset_info(good: Path, work: Path, data: st.DataObject) -> None:
    value = data.draw(edited(json.loads((good / "train.dataset.json").read_text())))
    restore = _with(work, good, "train.dataset.json", json.dumps(value).encode())
    try:
        _open_all(work)
    except DatasetError:
        pass
    finally:
        restore()


@FUZZ
@given(data=st.data())
def test_mutated_classes_json(good: Path, work: Path, data: st.DataObject) -> None:
    original = (good / "classes.json").read_bytes()
    if data.draw(st.booleans()):
        blob = data.draw(mutated(original))
    else:
        blob = json.dumps(data.draw(edited(json.loads(original)))).encode()
    restore = _with(work, good, "classes.json", blob)
    try:
        _open_all(work)
    except DatasetError as exc:
        assert "classes.json" in str(exc)
    finally:
        restore()


@FUZZ
@given(data=st.data())
def test_random_and_mutated_bytes_as_manifest(good: Path, work: Path, data: st.DataObject) -> None:
    original = (good / "train.parquet").read_bytes()
    blob = data.draw(st.binary(max_size=400) | mutated(original))
    restore = _with(work, good, "train.parquet", blob)
    try:
        read_manifest(Location(str(work)), "train")
        ShardSet.open(Location(str(work)), "train")  # a change parquet does not notice may still read
    except DatasetError as exc:
        assert "train.parquet" in str(exc)
    finally:
        restore()


def _manifest_with(good: Path, column: str, values: list[Any]) -> bytes:
    table = pq.read_table(good / "train.parquet")
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.array(values, MANIFEST_SCHEMA.field(column).type))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@FUZZ
@given(data=st.data())
def test_manifest_with_arbitrary_numbers(good: Path, work: Path, data: st.DataObject) -> None:
    """Offsets, sizes, shards and labels that no build writes: refused at open, or read without a crash."""
    rows = pq.read_metadata(good / "train.parquet").num_rows
    column = data.draw(st.sampled_from(["label", "shard", "offset", "size", "width", "height"]))
    bits = 32 if MANIFEST_SCHEMA.field(column).type == pa.int32() else 64
    values = data.draw(st.lists(st.integers(-2 ** (bits - 1), 2 ** (bits - 1) - 1) | st.integers(-600, 50_000),
                                min_size=rows, max_size=rows))
    restore = _with(work, good, "train.parquet", _manifest_with(good, column, values))
    try:
        shards = ShardSet.open(Location(str(work)), "train")
    except DatasetError:
        restore()
        return
    try:
        metrics = StreamMetrics()
        pieces = PieceReader(shards, StreamConfig(max_read_retries=0), metrics)
        got = {}
        for shard, count in enumerate(shards.counts):
            if count:
                got.update(pieces.read(shard, 0, int(count)))
        assert len(got) + metrics.corrupt_samples + sum(
            v for k, v in metrics.reasons.items() if k.startswith("unreadable")) == len(shards)
        inspect(Location(str(work)), threads=1)
    finally:
        restore()


@FUZZ
@given(data=st.data())
def test_mutated_shard_bytes_are_skipped_and_found(good: Path, work: Path, data: st.DataObject) -> None:
    shards = ShardSet.open(Location(str(good)), "train")
    shard = data.draw(st.integers(0, len(shards.counts) - 1))
    name = shards.shard_names[shard]
    original = (good / name).read_bytes()
    first = int(shards.shard_starts[shard])
    rows = range(first, first + int(shards.counts[shard]))
    headers = tuple(h for r in rows for h in (int(shards.offsets[r]) - 512,
                                              int(shards.offsets[r] + -(-shards.sizes[r] // 512) * 512)))
    blob = data.draw(mutated(original, headers))
    restore = _with(work, good, name, blob)
    try:
        metrics = StreamMetrics()
        opened = ShardSet.open(Location(str(work)), "train")
        got = PieceReader(opened, StreamConfig(max_read_retries=0), metrics, verify_hashes=True).read(
            shard, 0, int(opened.counts[shard]))
        unreadable = sum(v for k, v in metrics.reasons.items() if k.startswith("unreadable"))
        assert len(got) + metrics.corrupt_samples + unreadable == int(opened.counts[shard])
        for row, sample in got.items():
            assert sample.data == (good / name).read_bytes()[opened.offsets[row]:][:opened.sizes[row]]
        result = inspect(Location(str(work)), threads=1)
        assert result.ok == (blob == original), result.problems
        if blob != original:
            assert any(name in p for p in result.problems)
    finally:
        restore()


def _encoded(fmt: str, mode: str) -> bytes:
    image = Image.open(io.BytesIO(jpeg_bytes(np.random.default_rng(7), 40, 30))).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


SOURCE_FILES = [_encoded(fmt, mode) for fmt, mode in [("JPEG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"),
                                                        ("PNG", "RGBA"), ("GIF", "P"), ("WEBP", "RGB"),
                                                        ("TIFF", "RGB"), ("BMP", "RGB")]]


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF|Truncated File|Tag data|Metadata Warning):UserWarning")
@FUZZ
@given(data=st.data(), max_side=st.sampled_from([None, 16]), verify=st.booleans())
def test_mutated_source_images_are_prepared_or_bad(data: st.DataObject, max_side: int | None, verify: bool) -> None:
    """The build's per-file check: a damaged source file is a `BadImage` (counted in the report), never a
    crash of the shard writer."""
    blob = data.draw(st.sampled_from(SOURCE_FILES).flatmap(mutated))
    try:
        prepared = prepare_image(blob, max_side, verify)
    except BadImage:
        return
    if prepared.conversion:
        with Image.open(io.BytesIO(prepared.data)) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (prepared.width, prepared.height))
    else:
        assert prepared.data is blob
