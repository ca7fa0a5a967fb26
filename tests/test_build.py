"""build-shards on a local folder: round trip, report, determinism, refusals."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from pipeline.build import BuildConfig, BuildError, build_shards
from pipeline.manifest import MANIFEST_SCHEMA, fingerprint, read_info
from pipeline.storage import Location
from tests.imagetree import Tree, make_tree
from tests.shards import read_manifest_rows, read_shards, sha


def _build(tree: Tree, dst: Path | str, **options) -> dict:
    options.setdefault("max_bad", 0.5)
    options.setdefault("workers", 1)
    return build_shards(BuildConfig(src=str(tree.root), dst=Location(str(dst)), **options)).info


def check_round_trip(tree: Tree, fs, root: str) -> None:
    """Every usable source file comes back: its exact bytes (or its conversion) and its label."""
    rows = read_manifest_rows(fs, root)
    samples = read_shards(fs, root)
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == set(tree.usable), "manifest sources differ from the usable files"
    assert len(samples) == len(rows) == len(tree.usable)
    split_dir = tree.root / "train"
    classes = json.loads(fs.cat(f"{root}/classes.json"))["classes"]
    assert classes == tree.classes
    for source, row in by_source.items():
        data, label = samples[row["key"]]
        assert label == row["label"] == tree.usable[source]
        assert classes[label] == source.split("/")[0]
        assert sha(data) == row["sha256"] and len(data) == row["size"]
        original = (split_dir / source).read_bytes()
        if source in tree.good:
            assert data == original and row["conversion"] == ""
        else:
            assert row["conversion"] == tree.converted[source][1]
            with Image.open(io.BytesIO(data)) as img:  # a real RGB JPEG of the same picture size
                assert (img.format, img.mode) == ("JPEG", "RGB")
                assert img.size == Image.open(io.BytesIO(original)).size == (row["width"], row["height"])


def test_round_trip_with_defects(tree: Tree, tmp_path: Path) -> None:
    info = _build(tree, tmp_path / "dst", shard_bytes=20_000)
    fs = fsspec.filesystem("file")
    check_round_trip(tree, fs, str(tmp_path / "dst"))
    assert info["num_samples"] == len(tree.usable) and info["num_shards"] > 3
    report = json.loads((tmp_path / "dst" / "train.report.json").read_text())
    assert {b["source"] for b in report["bad"]} == set(tree.bad)
    reasons = {b["source"]: b["reason"] for b in report["bad"]}
    for source, fragment in tree.bad.items():
        assert fragment in reasons[source]
    assert {i["source"] for i in report["ignored"]} == set(tree.ignored)
    assert report["empty_classes"] == tree.empty_classes
    assert report["conversions"] == {"cmyk->rgb": 1, "l->rgb": 1, "png->jpeg": 1}
    assert not (tmp_path / "dst" / "_build").exists(), "build state must be removed after success"


def test_shards_are_class_mixed_and_cut_to_size(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=5, per_class=20, defects=False)
    info = _build(tree, tmp_path / "dst", shard_bytes=60_000, seed=3)
    rows = read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"))
    assert [r["shard"] for r in rows] == sorted(r["shard"] for r in rows), "manifest is in shard order"
    first = [r["label"] for r in rows if r["shard"] == 0]
    assert len(set(first)) >= 3, f"first shard should mix classes, has labels {first}"
    for shard in info["shards"][:-1]:
        assert shard["bytes"] <= 60_000 + 10_240  # tar end-of-archive padding
    keys = [r["key"] for r in rows]
    assert keys != sorted(keys), "samples must be shuffled globally"


def test_same_inputs_same_bytes_any_worker_count(tree: Tree, tmp_path: Path) -> None:
    one = _build(tree, tmp_path / "a", shard_bytes=20_000, workers=1)
    two = _build(tree, tmp_path / "b", shard_bytes=20_000, workers=2)
    assert one["fingerprint"] == two["fingerprint"]
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    other_seed = _build(tree, tmp_path / "c", shard_bytes=20_000, seed=1)
    assert other_seed["fingerprint"] != one["fingerprint"]


def test_manifest_schema_and_fingerprint(tree: Tree, tmp_path: Path) -> None:
    info = _build(tree, tmp_path / "dst")
    fs = fsspec.filesystem("file")
    rows = read_manifest_rows(fs, str(tmp_path / "dst"))
    assert list(rows[0]) == MANIFEST_SCHEMA.names
    assert fingerprint(tree.classes, rows) == info["fingerprint"]
    assert read_info(Location(str(tmp_path / "dst")), "train").fingerprint == info["fingerprint"]


def test_rerun_is_a_no_op_and_other_inputs_are_refused(tree: Tree, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    first = _build(tree, dst)
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    assert _build(tree, dst) == first
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before, "a no-op must write nothing"
    with pytest.raises(BuildError, match="different build.*--overwrite"):
        _build(tree, dst, seed=7)
    replaced = _build(tree, dst, seed=7, overwrite=True)
    assert replaced["fingerprint"] != first["fingerprint"]
    check_round_trip(tree, fsspec.filesystem("file"), str(dst))


def test_too_many_bad_files_fails_without_committing(tree: Tree, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    with pytest.raises(BuildError, match=r"unusable .*--max-bad"):
        _build(tree, dst, max_bad=0.01)
    assert not (dst / "train.dataset.json").exists(), "a failed build must not look complete"
    assert (dst / "train.report.json").exists(), "the report says which files were bad"
    info = _build(tree, dst, max_bad=0.5)  # raising the threshold finishes from the kept shards
    assert info["num_samples"] == len(tree.usable)


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "train" / "n0001"
    folder.mkdir(parents=True)
    (folder / "a.JPEG").write_bytes(b"")
    (folder / "b.JPEG").write_bytes(b"not really a jpeg")
    with pytest.raises(BuildError, match="none of the 2 image files"):
        build_shards(BuildConfig(src=str(tmp_path / "src"), dst=Location(str(tmp_path / "dst")), workers=1))
    (tmp_path / "bare").mkdir()
    with pytest.raises(BuildError, match="no class folders and no images"):
        build_shards(BuildConfig(src=str(tmp_path / "bare"), dst=Location(str(tmp_path / "d")), workers=1))

def test_max_side_reencodes_large_images(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=2, per_class=3, defects=False, size_range=(80, 120))
    _build(tree, tmp_path / "dst", max_side=64)
    rows = read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"))
    assert all(max(r["width"], r["height"]) == 64 and r["conversion"] == "resized" for r in rows)


def test_secrets_in_storage_options_are_not_logged(tree: Tree, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    secret = "SENTINEL-SECRET-0123456789"
    location = Location(str(tmp_path / "dst"), {"secret": secret, "key": secret, "auto_mkdir": True})
    assert secret not in repr(location)
    with caplog.at_level(logging.DEBUG):
        build_shards(BuildConfig(src=str(tree.root), dst=location, workers=1, max_bad=0.5))
    assert secret not in caplog.text
    for path in (tmp_path / "dst").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret leaked into {path.name}"
