"""A build killed in the middle resumes: complete shards are kept, the result is identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.imagetree import make_tree


def _cli(src: Path, dst: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "build-shards", "--src", str(src), "--dst", str(dst),
            "--shard-samples", "2", "--workers", "1", "--max-bad", "0.5", *extra]


def _outputs(dst: Path) -> dict[str, bytes]:
    keep = (".tar", ".parquet", ".json")
    return {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file() and p.name.endswith(keep)}


def test_kill_mid_build_then_rerun_gives_identical_output(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=6, per_class=60, size_range=(64, 160))
    reference = tmp_path / "reference"
    subprocess.run(_cli(tree.root, reference), check=True, capture_output=True)

    dst = tmp_path / "dst"
    proc = subprocess.Popen(_cli(tree.root, dst), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = dst / "_build" / "train"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(parts.glob("train-*.json"))) < 20:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if (dst / "train.dataset.json").exists():
        pytest.fail("the build finished before it could be killed; make the tree larger")
    kept = len(list(parts.glob("train-*.json")))
    assert kept >= 20
    (dst / ".tmp-deadbeef-train-000999.tar").write_bytes(b"half a shard")  # as a kill mid-write leaves

    rerun = subprocess.run(_cli(tree.root, dst), check=True, capture_output=True, text=True)
    assert f"({kept} already complete)" in rerun.stderr
    produced = _outputs(dst)
    expected = _outputs(reference)
    assert produced.keys() == expected.keys()
    for name in expected:
        assert produced[name] == expected[name], f"{name} differs from the uninterrupted build"
