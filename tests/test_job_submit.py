"""`ray job submit -- python -m trainer.main RECIPE` against a real local Ray head runs the recipe to the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dali]


def test_ray_job_submit_runs_a_recipe(ray_head, tmp_path: Path) -> None:
    from pipeline.build import BuildConfig, build_shards
    from pipeline.demo import write_digits_tree
    from pipeline.storage import Location

    write_digits_tree(tmp_path / "digits", size=32)
    shards = str(tmp_path / "shards")
    for split in ("train", "val"):
        build_shards(BuildConfig(src=str(tmp_path / "digits"), dst=Location(shards), split=split,
                                 shard_bytes=500_000, workers=1))
    ray = Path(sys.executable).with_name("ray")
    entry = [sys.executable, "-m", "trainer.main", "demo_deit_tiny", f"data.train_url={shards}",
             f"data.val_url={shards}", "schedule.epochs=1", "schedule.warmup_epochs=0",
             "optim.micro_batches=2",  # 2 DDP workers (gloo): the first pass of a step without an all-reduce
             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "runs"),
             "--name", "submitted"]
    out = subprocess.run([str(ray), "job", "submit", "--address", ray_head.dashboard_url, "--", *entry],
                         env={**os.environ, **ray_head.env()}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    checkpoints = list((tmp_path / "runs" / "submitted").rglob("checksums.json"))
    assert checkpoints, "the submitted run wrote no checkpoint"
