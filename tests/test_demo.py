"""The README's main job, shortened (--quick), as a user runs it: every stage for real, accuracies far
above chance (10%)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dali]


def test_main_job_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "infra.demo", "--out", str(tmp_path / "demo"), "--quick"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    scores = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^  (.+?)\s+([\d.]+)%$", out.stdout, re.M)}
    assert set(scores) == {"teacher (resnet10t)", "student DeiT-tiny, no distillation",
                           "student DeiT-tiny, distilled (cache)"}, out.stdout
    assert scores["teacher (resnet10t)"] > 80
    assert scores["student DeiT-tiny, no distillation"] > 30
    assert scores["student DeiT-tiny, distilled (cache)"] > 30
    assert "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    demo = tmp_path / "demo"
    assert (demo / "mlflow.db").exists() and (demo / "teacher-cache" / "cache.json").exists()
    assert (demo / "shards" / "train.dataset.json").exists() and (demo / "shards" / "val.dataset.json").exists()
