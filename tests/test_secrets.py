"""No secret leaks: object-store keys and the tracking token, planted as sentinels in the environment of a
whole run on real parts (shards and a teacher cache built into S3, a distilled student trained through
Ray Train with checkpoints on S3, tracked on an MLflow server), never appear in anything the run wrote:
console output, objects in the store, the MLflow database and artifacts, Ray's session logs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.dali]

SECRET = "sentinelSECRETkey0x5f3759df"
TOKEN = "sentinelTOKEN0xdeadbeefcafe"


def _scan_tree(root: Path, found: dict[str, int], needles: list[bytes]) -> tuple[int, int]:
    files = size = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            files, size = files + 1, size + len(data)
            for needle in needles:
                if needle in data:
                    found[str(path)] = found.get(str(path), 0) + 1
    return files, size


def test_sentinel_secrets_appear_nowhere_a_run_writes(tmp_path: Path, object_store: Any, mlflow_server: Any,
                                                      s3_url: str) -> None:
    import fsspec

    from pipeline.demo import write_digits_tree
    from trainer import recipes

    src = tmp_path / "src"
    write_digits_tree(src, size=32)
    for split, keep in (("train", 30), ("val", 8)):
        for folder in sorted((src / split).iterdir()):
            for file in sorted(folder.iterdir())[keep:]:
                file.unlink()
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(recipes.get("demo_teacher").model.build().state_dict(), teacher)

    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, **object_store.env(), "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_TOKEN": TOKEN,
           "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    shards, cache, runs = f"{s3_url}/shards", f"{s3_url}/cache", f"{s3_url}/runs"
    commands = [
        *[["-m", "pipeline.cli", "build-shards", "--src", str(src / split), "--dst", shards, "--split", split,
           "--workers", "1", "--shard-size", "60KB"] for split in ("train", "val")],
        ["-m", "teacher_cache.cli", "build", "--teacher", "resnet10t", "--weights", str(teacher), "--num-classes",
         "10", "--shards", shards, "--out", cache, "--resolution", "32", "--topk", "4", "--workers", "1"],
        ["-m", "trainer.main", "demo_deit_tiny_distill", f"data.train_url={shards}", f"data.val_url={shards}",
         "schedule.epochs=1", "schedule.warmup_epochs=0", "checkpoint.every_n_steps=2", "distill.source=cache",
         f"distill.cache_url={cache}", f"distill.teacher.pretrained_path={teacher}",
         "tracking.experiment=test-secrets", "--storage", runs, "--name", "secret"],
    ]
    console = []
    try:
        for argv in commands:
            out = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=600,
                                 cwd=tmp_path)
            console.append(out.stdout + out.stderr)
            assert out.returncode == 0, f"{argv[1]} failed:\n{out.stderr[-4000:]}"

        found: dict[str, int] = {}
        needles = [SECRET.encode(), TOKEN.encode()]
        for i, text in enumerate(console):
            if any(n.decode() in text for n in needles):
                found[f"console of command {i}"] = 1
        # every object the run put in the store (read with the server's real credentials)
        fs = fsspec.filesystem("s3", **object_store.storage_options())
        objects = [p for p in fs.find(s3_url.removeprefix("s3://"))]
        for path in objects:
            data = fs.cat_file(path)
            if any(n in data for n in needles):
                found[f"s3://{path}"] = 1
        names = "\n".join(objects)
        assert "/shards/train.parquet" in names and "/cache/cache.json" in names
        assert "/runs/secret/checkpoint_manager_snapshot.json" in names and "/runs/secret/step-" in names
        # the MLflow server's store: metadata DB (params, tags, metrics) and artifacts
        db = Path(mlflow_server.backend_store_uri.removeprefix("sqlite:///"))
        scanned = [_scan_tree(db.parent, found, needles), _scan_tree(Path(ray_tmp), found, needles),
                   _scan_tree(tmp_path, found, needles)]
        assert scanned[1][0] > 10, "Ray's session logs were not where the test looks"
        assert not found, f"a planted secret leaked into: {sorted(found)}"

        from mlflow import MlflowClient

        client = MlflowClient(mlflow_server.tracking_uri)
        experiment = client.get_experiment_by_name("test-secrets")
        runs_found = client.search_runs([experiment.experiment_id])
        assert len(runs_found) == 1 and runs_found[0].info.status == "FINISHED"
        assert len(runs_found[0].data.params) > 80  # the params were logged, and are clean (scanned above)
        final = {a.path for a in client.list_artifacts(runs_found[0].info.run_id, "checkpoint")}
        assert "checkpoint/state.pt" in final  # downloaded from the S3 run folder, then logged (scanned above)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
