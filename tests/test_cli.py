"""The `pipeline` command as a user runs it: exit codes, clear errors, the bench table, the demo tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main, parse_size
from tests.imagetree import Tree


def test_sizes_parse() -> None:
    assert parse_size("256MB") == 256 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("1500") == 1500
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_build_then_inspect_from_the_console_script(tree: Tree, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("pipeline")
    dst = tmp_path / "dst"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    build = subprocess.run([str(exe), "build-shards", "--src", str(tree.root), "--dst", f"file://{dst}",
                            "--shard-size", "20KB", "--max-bad", "0.5", "--workers", "2"],
                           capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr
    assert f"{len(tree.usable)} samples" in build.stdout
    assert "build-shards train:" in build.stderr, "progress lines when not on a terminal"
    check = subprocess.run([str(exe), "inspect", str(dst)], capture_output=True, text=True)
    assert check.returncode == 0 and "OK" in check.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--storage-options", "{not json"], "--storage-options is not valid JSON"),
    (["--storage-options", "[1]"], "must be a JSON object"),
    (["--workers", "0"], "--workers 0"),
    (["--split", "my-split"], "--split 'my-split'"),
])
def test_bad_arguments_name_the_flag(tree: Tree, tmp_path: Path, args: list[str], message: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    code = main(["build-shards", "--src", str(tree.root), "--dst", str(tmp_path / "d"), *args])
    assert code == 2
    assert message in caplog.text


def test_missing_source_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["build-shards", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "d")]) == 2
    assert "not a folder" in caplog.text


def test_storage_whose_package_is_missing_names_the_extra_to_install(tree: Tree, caplog: pytest.LogCaptureFixture,
                                                                      ) -> None:
    """gs:// needs gcsfs, an optional extra (``distillery[gcs]``): without it the command says so and exits 2,
    before writing anything (adlfs has no extra here: the message names fsspec's package)."""
    import importlib.util

    if any(importlib.util.find_spec(name) is not None for name in ("gcsfs", "adlfs")):
        pytest.skip("gcsfs or adlfs is installed here")
    assert main(["build-shards", "--src", str(tree.root), "--dst", "gs://bucket/shards"]) == 2
    assert "gs://bucket/shards: gs:// storage is not installed" in caplog.text
    assert "pip install 'distillery[gcs]'" in caplog.text
    from pipeline.storage import Location, MissingFilesystem

    with pytest.raises(MissingFilesystem, match="abfs:// storage is not installed .*adlfs.*install the package"):
        Location("abfs://container/shards").fs_and_path()


def test_bench_build_prints_both_rows(tmp_path: Path, tree: Tree, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "build", "--src", str(tree.root), "--workers", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"plain", "build-shards"}
    ratio = float(rows["build-shards"][-1])
    assert ratio > 0 and float(rows["plain"][-1]) == 1.0


def test_demo_tree_is_real_labelled_digits(tmp_path: Path) -> None:
    assert main(["demo-tree", "--dst", str(tmp_path / "digits"), "--size", "16"]) == 0
    train = sorted(p.name for p in (tmp_path / "digits" / "train").iterdir())
    assert train == [f"digit{k}" for k in range(10)]
    n_train = sum(1 for _ in (tmp_path / "digits" / "train").rglob("*.JPEG"))
    n_val = sum(1 for _ in (tmp_path / "digits" / "val").rglob("*.JPEG"))
    assert n_train + n_val == 1797 and 0.15 < n_val / 1797 < 0.25
    assert main(["build-shards", "--src", str(tmp_path / "digits"), "--dst", str(tmp_path / "s"),
                 "--workers", "1"]) == 0
    info = json.loads((tmp_path / "s" / "train.dataset.json").read_text())
    assert info["num_samples"] == n_train and info["num_classes"] == 10
