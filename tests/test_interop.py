"""Our shards are plain WebDataset: webdataset's own reader and DALI's reader see the same samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from pipeline.build import BuildConfig, build_shards
from pipeline.storage import Location
from tests.imagetree import Tree
from tests.shards import read_manifest_rows


@pytest.fixture
def built(tree: Tree, tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    dst = tmp_path / "dst"
    build_shards(BuildConfig(src=str(tree.root), dst=Location(str(dst)), shard_bytes=25_000, workers=1,
                             max_bad=0.5))
    rows = read_manifest_rows(fsspec.filesystem("file"), str(dst))
    return dst, {r["key"]: r for r in rows}


def test_webdataset_reads_every_sample(built: tuple[Path, dict[str, dict]]) -> None:
    import webdataset as wds

    dst, rows = built
    urls = [str(p) for p in sorted(dst.glob("train-*.tar"))]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls"):
        key, image, label = sample
        seen[key] = label
        assert image.shape == (rows[key]["height"], rows[key]["width"], 3)
    assert seen == {k: r["label"] for k, r in rows.items()}


@pytest.mark.dali
def test_dali_webdataset_reader_on_cpu(built: tuple[Path, dict[str, dict]], tmp_path: Path) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    dst, rows = built
    tars = [str(p) for p in sorted(dst.glob("train-*.tar"))]
    indexes = []
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for tar in tars:
        index = tmp_path / (Path(tar).stem + ".idx")
        subprocess.run([str(wds2idx), tar, str(index)], check=True, capture_output=True)
        indexes.append(str(index))
        # DALI's index agrees with the manifest's offsets and sizes
        for line in index.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[0] == "jpg":
                key = fields[3].split(".")[0]
                assert (int(fields[1]), int(fields[2])) == (rows[key]["offset"], rows[key]["size"])

    @dali.pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "cls"],
                                         missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, jpg

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == len(rows)
    seen: dict[str, int] = {}
    while len(seen) < len(rows):
        images, labels, raw = pipe.run()
        for i in range(len(images)):
            key = Path(raw[i].source_info().rsplit(":", 1)[-1]).stem
            seen[key] = int(bytes(labels.at(i)).decode())
            assert images.at(i).shape == (rows[key]["height"], rows[key]["width"], 3)
    assert seen == {k: r["label"] for k, r in rows.items()}
