"""Source layouts: class folders, flat val with a label file, fixed class lists."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.build import BuildConfig, BuildError, build_shards
from pipeline.sources import SourceError, scan
from pipeline.storage import Location
from pipeline.synthetic import jpeg_bytes
from tests.imagetree import make_tree
from tests.shards import read_manifest_rows


def _flat_val(root: Path, wnids: list[str], per_class: int = 2) -> dict[str, str]:
    """ImageNet's val layout: val/ILSVRC2012_val_*.JPEG and a label per file."""
    rng = np.random.default_rng(1)
    (root / "val").mkdir(parents=True)
    labels = {}
    for i in range(per_class * len(wnids)):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (root / "val" / f"{name}.JPEG").write_bytes(jpeg_bytes(rng, 40, 30))
        labels[name] = wnids[(i * 7) % len(wnids)]
    return labels


def test_class_indices_are_sorted_folder_names(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, num_classes=3, per_class=2, defects=False)
    listing = scan(tmp_path, "train")
    assert listing.layout == "class-folders"
    assert listing.classes == sorted(tree.classes)
    for sample in listing.samples:
        assert listing.classes[sample.label] == sample.relpath.split("/")[0]


def test_flat_val_with_kaggle_solution_csv(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, num_classes=3, per_class=2, defects=False)
    labels = _flat_val(tmp_path, tree.classes)
    lines = ["ImageId,PredictionString"] + [f"{k},{v} 10 20 30 40 {v} 1 2 3 4" for k, v in labels.items()]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    dst = Location(str(tmp_path / "dst"))
    build_shards(BuildConfig(src=str(tmp_path), dst=dst, split="train", workers=1))
    build_shards(BuildConfig(src=str(tmp_path), dst=dst, split="val", workers=1))
    rows = read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"), "val")
    assert len(rows) == len(labels)
    for row in rows:  # val numbered by train's classes.json
        assert tree.classes[row["label"]] == labels[row["source"].removesuffix(".JPEG")]


def test_kaggle_tree_finds_its_solution_csv_three_levels_up(tmp_path: Path) -> None:
    """imagenet-object-localization-challenge/{LOC_val_solution.csv, ILSVRC/Data/CLS-LOC/{train,val}}."""
    src = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    tree = make_tree(src, num_classes=2, per_class=1, defects=False)
    labels = _flat_val(src, tree.classes)
    lines = ["ImageId,PredictionString"] + [f"{k},{v} 1 2 3 4" for k, v in labels.items()]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    listing = scan(src, "val", classes=tree.classes)
    assert listing.layout == "flat+labels" and len(listing.samples) == len(labels)
    assert all(tree.classes[s.label] == labels[s.relpath.removesuffix(".JPEG")] for s in listing.samples)


def test_flat_val_with_file_label_lines_and_integer_labels(tmp_path: Path) -> None:
    labels = _flat_val(tmp_path, ["a", "b", "c"])
    ints = {k: "abc".index(v) for k, v in labels.items()}
    label_file = tmp_path / "val_labels.txt"
    label_file.write_text("".join(f"{k}.JPEG {v}\n" for k, v in ints.items()))
    listing = scan(tmp_path, "val", labels_file=str(label_file))
    assert listing.layout == "flat+labels"
    assert {s.relpath: s.label for s in listing.samples} == {f"{k}.JPEG": v for k, v in ints.items()}


def test_flat_without_labels_is_a_clear_error(tmp_path: Path) -> None:
    _flat_val(tmp_path, ["a"])
    with pytest.raises(SourceError, match="--labels"):
        scan(tmp_path, "val")


def test_val_class_folders_use_train_classes(tmp_path: Path) -> None:
    make_tree(tmp_path, split="train", num_classes=4, per_class=1, defects=False)
    make_tree(tmp_path, split="val", num_classes=4, per_class=1, defects=False, seed=3)
    (tmp_path / "val" / "n01007919").rename(tmp_path / "val-removed")  # val lacks one class
    dst = Location(str(tmp_path / "dst"))
    build_shards(BuildConfig(src=str(tmp_path), dst=dst, split="train", workers=1))
    build_shards(BuildConfig(src=str(tmp_path), dst=dst, split="val", workers=1))
    classes = json.loads((tmp_path / "dst" / "classes.json").read_text())["classes"]
    assert len(classes) == 4
    for row in read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"), "val"):
        assert classes[row["label"]] == row["source"].split("/")[0]


def test_unknown_class_against_given_list_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path, num_classes=2, per_class=1, defects=False)
    (tmp_path / "classes.json").write_text(json.dumps(["n01000000"]))
    with pytest.raises(BuildError, match="not in the given class list"):
        build_shards(BuildConfig(src=str(tmp_path), dst=Location(str(tmp_path / "dst")), workers=1,
                                 classes_file=str(tmp_path / "classes.json")))


def test_symlink_loop_does_not_hang(tmp_path: Path) -> None:
    make_tree(tmp_path, num_classes=2, per_class=2, defects=False)
    (tmp_path / "train" / "n01000000" / "loop").symlink_to(tmp_path / "train", target_is_directory=True)
    listing = scan(tmp_path, "train")
    assert len(listing.samples) == 4


def test_a_split_missing_from_a_dataset_root_is_refused_not_built_from_the_other_splits(tmp_path: Path) -> None:
    """--split test over a root holding train/ and val/ must not make "train" and "val" two classes."""
    make_tree(tmp_path, "train", num_classes=2, per_class=2, defects=False)
    make_tree(tmp_path, "val", num_classes=2, per_class=1, defects=False)
    with pytest.raises(SourceError, match=r"has no 'test' folder \(it holds train/, val/\): pass --split train "
                                          r"or --split val"):
        scan(tmp_path, "test")
    assert scan(tmp_path, "val").classes == scan(tmp_path, "train").classes  # the splits themselves build


def test_an_image_folder_with_a_class_named_like_a_split_still_builds(tmp_path: Path) -> None:
    for name in ("cat", "dog", "test"):
        (tmp_path / "animals" / name).mkdir(parents=True)
        (tmp_path / "animals" / name / "a.jpg").write_bytes(jpeg_bytes(np.random.default_rng(0), 20, 20))
    assert scan(tmp_path / "animals", "train").classes == ["cat", "dog", "test"]


def test_one_split_folder_as_src_builds_and_says_when_its_name_differs(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    make_tree(tmp_path, "val", num_classes=2, per_class=2, defects=False)
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        listing = scan(tmp_path / "val", "train")
    assert len(listing.samples) == 4 and "is a 'val' folder, built as split 'train'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        scan(tmp_path / "val", "val")
    assert caplog.text == ""
