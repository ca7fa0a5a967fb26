"""`pipeline inspect` finds what is wrong with built shards, and passes what is right."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildConfig, build_shards
from pipeline.cli import main
from pipeline.inspect import inspect
from pipeline.manifest import DatasetError
from pipeline.storage import Location
from tests.imagetree import Tree


@pytest.fixture
def built(tree: Tree, tmp_path: Path) -> Path:
    dst = tmp_path / "dst"
    build_shards(BuildConfig(src=str(tree.root), dst=Location(str(dst)), shard_bytes=20_000, workers=1,
                             max_bad=0.5))
    return dst


def test_clean_build_passes(built: Path, tree: Tree, capsys: pytest.CaptureFixture) -> None:
    result = inspect(Location(str(built)), decode=True)
    assert result.ok, result.problems
    assert result.num_samples == len(tree.usable) and result.num_classes == len(tree.classes)
    assert main(["inspect", str(built)]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_in_a_shard_is_found(built: Path) -> None:
    shard = built / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's image bytes
    shard.write_bytes(bytes(data))
    problems = inspect(Location(str(built))).problems
    assert any("train-000001.tar: sha256 differs" in p for p in problems)
    assert any("content differs from the manifest hash" in p for p in problems)
    assert main(["inspect", str(built)]) == 1


def test_missing_and_truncated_shards_are_found(built: Path) -> None:
    (built / "train-000000.tar").unlink()
    last = sorted(built.glob("train-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:700])
    problems = inspect(Location(str(built))).problems
    assert "train-000000.tar: missing" in problems
    assert any(last.name in p and ("not a readable tar" in p or "missing from the shard" in p) for p in problems)


def test_edited_manifest_breaks_the_fingerprint(built: Path) -> None:
    table = pq.read_table(built / "train.parquet")
    labels = table.column("label").to_pylist()
    labels[0] = (labels[0] + 1) % 4
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    pq.write_table(table, built / "train.parquet")
    problems = inspect(Location(str(built))).problems
    assert any("fingerprint" in p for p in problems)
    assert any(".cls says" in p for p in problems)


def test_unknown_format_version_is_refused(built: Path) -> None:
    info = json.loads((built / "train.dataset.json").read_text())
    info["version"] = 99
    (built / "train.dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="version 99 is not understood"):
        inspect(Location(str(built)))


def test_unbuilt_split_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="run `pipeline build-shards --src FOLDER --dst .* --split val`"):
        inspect(Location(str(tmp_path)), "val")
