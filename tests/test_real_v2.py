"""Evaluation on ImageNet-ReaL labels and ImageNet-V2 (DeiT Table 5's other columns): ReaL accuracy equals
timm's ``RealLabelsImagenet`` on the same predictions, V2 shards built with a class-index classes file are
evaluated with the right labels, and bad label files are refused naming the entry or the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.build import BuildConfig, build_shards
from pipeline.loader import EvalLoader
from pipeline.manifest import DatasetError, read_manifest
from pipeline.storage import Location
from pipeline.stream import ShardSet
from pipeline.synthetic import jpeg_bytes
from trainer.real_labels import load_real_labels

pytestmark = pytest.mark.dali

CLASSES, IMAGES = 12, 48  # 12 > 10: sorted folder names "0", "1", "10", "11", "2" ... are not class order


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """ImageNet-style val (class folders of ILSVRC2012_val_*.JPEG), the same images as a V2-style tree
    (folders named by class index), their shards, and a ReaL file with some empty and multi-label entries."""
    root = tmp_path_factory.mktemp("realv2")
    rng = np.random.default_rng(0)
    wnids = [f"n{1000 + k:08d}" for k in range(CLASSES)]
    for i in range(1, IMAGES + 1):
        k = i % CLASSES
        data = jpeg_bytes(rng, 40, 36)
        for folder in (root / "val" / wnids[k], root / "v2" / str(k)):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(data)
    (root / "v2-classes.json").write_text(json.dumps([str(k) for k in range(CLASSES)]))
    for split in ("val", "train"):  # a train split too, for the trainer's preflight
        build_shards(BuildConfig(src=str(root / "val"), dst=Location(str(root / "val-shards")), split=split,
                                 workers=1))
    build_shards(BuildConfig(src=str(root / "v2"), dst=Location(str(root / "v2-shards")), split="val", workers=1,
                             classes_file=str(root / "v2-classes.json")))
    real = [[] if i % 7 == 0 else sorted({i % CLASSES, (3 * i) % CLASSES}) for i in range(1, IMAGES + 1)]
    (root / "real.json").write_text(json.dumps(real))
    return {"val": str(root / "val-shards"), "v2": str(root / "v2-shards"), "real": str(root / "real.json"),
            "root": str(root)}


def _labels_by_file(location: Location) -> dict[str, int]:
    table = read_manifest(location, "val")
    return {Path(src).name: label for src, label in zip(table.column("source").to_pylist(),
                                                         table.column("label").to_pylist(), strict=True)}


def _config(sets: dict[str, str]):
    from trainer.overrides import apply_overrides
    from trainer.recipes import get

    return apply_overrides(get("demo_deit_tiny"), [f"model.num_classes={CLASSES}", f"data.val_url={sets['val']}",
                                                   f"data.train_url={sets['val']}", f"data.v2_url={sets['v2']}",
                                                   f"data.real_labels={sets['real']}", "data.batch_size=12",
                                                   "scaling.use_gpu=false"])


def test_real_and_v2_accuracy_match_timms_reference(sets: dict[str, str]) -> None:
    from timm.data.real_labels import RealLabelsImagenet

    from pipeline.batch_aug import normalize
    from trainer.worker import evaluate, local_parts

    config = _config(sets)
    val, v2 = (ShardSet.open(Location(sets[name]), "val") for name in ("val", "v2"))
    labels = [_labels_by_file(Location(sets[name])) for name in ("val", "v2")]
    assert labels[0] == labels[1], "V2 folder k is class k, as the val's wnid k"
    p = local_parts(config, torch.device("cpu"), eval_loader=EvalLoader(val, config.data, 10, dali_threads=1))
    p.real_labels = load_real_labels(sets["real"], val.location, CLASSES)
    p.v2_loader = EvalLoader(v2, config.data, 10, dali_threads=1)
    with torch.no_grad():  # larger random weights: predictions spread over the classes, not all one class
        for param in p.model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    metrics = evaluate(p)

    table = read_manifest(val.location, "val")
    source = dict(zip(table.column("key").to_pylist(), table.column("source").to_pylist(), strict=True))
    outputs, names, hits = [], [], 0
    p.model.eval()
    with torch.no_grad():
        for images, labels, keys in EvalLoader(val, config.data, 10, dali_threads=1):
            logits = p.model(normalize(images, config.data.augment).contiguous(memory_format=torch.channels_last))
            outputs.append(logits)
            names += [source[k] for k in keys]
            hits += int((logits.argmax(1) == labels).sum())
    reference = RealLabelsImagenet(names, real_json=sets["real"], topk=(1, 5))
    for logits in outputs:
        reference.add_result(logits)
    assert metrics["eval/real_top1"] == pytest.approx(reference.get_accuracy(1), abs=1e-9)
    assert metrics["eval/real_top5"] == pytest.approx(reference.get_accuracy(5), abs=1e-9)
    assert metrics["eval/real_top5"] > 0 and metrics["eval/real_top1"] <= metrics["eval/real_top5"]
    assert metrics["eval/real_samples"] == sum(1 for i in range(1, IMAGES + 1) if i % 7)
    assert metrics["eval/top1"] == pytest.approx(100 * hits / IMAGES)
    assert metrics["eval_v2/samples"] == IMAGES
    for k in ("top1", "top5"):  # the same images under the same labels
        assert metrics[f"eval_v2/{k}"] == pytest.approx(metrics[f"eval/{k}"])


def test_bad_real_labels_are_refused_before_training(sets: dict[str, str], tmp_path: Path) -> None:
    from dataclasses import replace

    from trainer.run import preflight

    val = Location(sets["val"])
    out_of_range = json.loads(Path(sets["real"]).read_text())
    out_of_range[3] = [CLASSES + 5]
    (tmp_path / "range.json").write_text(json.dumps(out_of_range))
    with pytest.raises(DatasetError, match=r"entry 3 .* outside 0\.\.11"):
        load_real_labels(str(tmp_path / "range.json"), val, CLASSES)
    (tmp_path / "short.json").write_text(json.dumps([[1]] * 10))
    with pytest.raises(DatasetError, match="10 entries"):
        load_real_labels(str(tmp_path / "short.json"), val, CLASSES)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not JSON"):
        load_real_labels(str(tmp_path / "bad.json"), val, CLASSES)
    with pytest.raises(DatasetError, match="no such file"):
        load_real_labels(str(tmp_path / "missing.json"), val, CLASSES)
    # a val split that is not ImageNet's: its file names say so
    other = tmp_path / "other" / "c0"
    other.mkdir(parents=True)
    for i in range(3):
        (other / f"img{i}.jpg").write_bytes(jpeg_bytes(np.random.default_rng(i), 30, 30))
    build_shards(BuildConfig(src=str(tmp_path / "other"), dst=Location(str(tmp_path / "os")), split="val", workers=1))
    with pytest.raises(DatasetError, match="not an ImageNet val file"):
        load_real_labels(sets["real"], Location(str(tmp_path / "os")), CLASSES)
    config = _config(sets)
    with pytest.raises(DatasetError, match="entry 3"):  # the driver refuses it before Ray starts
        preflight(replace(config, data=replace(config.data, real_labels=str(tmp_path / "range.json"))))
    with pytest.raises(DatasetError, match=r"model\.pretrained_path=\S*nope\.pth: no such file or folder"):
        preflight(replace(config, model=replace(config.model, pretrained_path=str(tmp_path / "nope.pth"))))
