"""A build killed in the middle resumes: complete shards are kept, the result is identical."""

from __future__ import annotations

import json
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


def test_damaged_build_state_is_redone_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged plan file and part files (bit rot, a hand edit) do not stop a resumed build: the plan is
    rewritten, the shards of the damaged parts are written again, and the output equals a clean build's."""
    from pipeline.build import BuildConfig, BuildError, build_shards
    from pipeline.storage import Location

    tree = make_tree(tmp_path / "src", num_classes=3, per_class=8)  # has a truncated and an empty file

    def config(dst: Path, max_bad: float) -> BuildConfig:
        return BuildConfig(src=str(tree.root / "train"), dst=Location(str(dst)), max_shard_samples=2, workers=1,
                           max_bad=max_bad)

    reference = build_shards(config(tmp_path / "reference", 0.5))
    dst = tmp_path / "dst"
    with pytest.raises(BuildError, match="max-bad"):  # fails at the end, every part file written
        build_shards(config(dst, 0.0))
    state = dst / "_build" / "train"
    parts = sorted(state.glob("train-*.json"))
    assert len(parts) == reference.shards_written >= 4
    (state / "plan.json").write_bytes(b"\x00\xff not json")
    parts[0].write_text("{truncated")
    parts[1].write_text(json.dumps({"plan": "only"}))
    parts[2].write_text(json.dumps([1, 2, 3]))
    with caplog.at_level("WARNING", logger="pipeline.build"):
        resumed = build_shards(config(dst, 0.5))
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 4 and any("plan.json" in m for m in damaged) and any("missing" in m for m in damaged)
    assert (resumed.shards_written, resumed.shards_kept) == (3, len(parts) - 3)
    assert _outputs(dst) == _outputs(tmp_path / "reference")
    assert not (dst / "_build").exists()
