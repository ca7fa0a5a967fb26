"""The training run: optimizer / schedule pieces, then real 2-worker Ray Train runs on real digit shards.

The Ray runs share one local Ray (loopback, 2 CPUs), one set of shards (400 train / 100 val digits at
32 px) and a random-weights resnet10t teacher saved to a file. The uninterrupted run is the reference:
the run whose rank 1 is killed mid-epoch must train on exactly its sample keys after the restart, and
both log to a real ``mlflow server`` process.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import recipes
from trainer.config import ConfigError, TrainConfig
from trainer.optim import build_optimizer, build_schedule, lr_at
from trainer.overrides import apply_overrides
from trainer.worker import RunOptions, decode, encode, loss_config

# ---------------------------------------------------------------------------------------------- units


def test_schedule_is_timms_cosine_with_warmup_per_step() -> None:
    from timm.scheduler import CosineLRScheduler

    total, warmup, peak, warmup_lr, min_lr = 50, 8, 2e-3, 1e-6, 1e-5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    timm_sched = CosineLRScheduler(optimizer, t_initial=total, lr_min=min_lr, warmup_t=warmup,
                                   warmup_lr_init=warmup_lr, t_in_epochs=False)
    for step in range(total + 5):
        timm_sched.step_update(step)
        assert lr_at(step, peak, total, warmup, warmup_lr, min_lr) == pytest.approx(optimizer.param_groups[0]["lr"])


def test_schedule_per_epoch_is_a_staircase_and_peak_lr_uses_the_effective_batch() -> None:
    config = recipes.get("deit_s")  # lr 5e-4 per 512, batch 1024 over 8 workers, repeats 3
    from pipeline.loader import effective_batch

    batch = effective_batch(config.data.batch_size, config.scaling.num_workers, config.data.stream.repeats)
    assert batch == 1008  # 128 views per worker rounded down to 42 images x 3
    schedule = build_schedule(config, batch, steps_per_epoch=10)
    assert schedule.peak == pytest.approx(5e-4 * 1008 / 512)
    assert schedule.total_steps == 300 * 10
    assert schedule.at(0) == config.schedule.warmup_lr and schedule.at(50) == pytest.approx(schedule.peak, rel=1e-3)
    staircase = build_schedule(apply_overrides(config, ["schedule.per_step=false"]), batch, steps_per_epoch=10)
    assert len({staircase.at(s) for s in range(10, 20)}) == 1  # constant within an epoch
    assert staircase.at(15) == pytest.approx(lr_at(1, schedule.peak, 300, 5, 1e-6, 1e-5))


def test_a_min_lr_above_the_effective_peak_ends_the_schedule_at_the_peak() -> None:
    """DeiT's 384 fine-tune runs at lr = min_lr = 5e-6 per 512; 480 effective views (8 GPUs at x3) put the
    peak just under min_lr, and cosine must not climb from it."""
    config = apply_overrides(recipes.get("deit_s"), ["optim.lr=5e-6", "optim.lr_batch_size=512",
                                                     "data.batch_size=512", "schedule.min_lr=5e-6"])
    schedule = build_schedule(config, 480, steps_per_epoch=10)
    assert schedule.peak == pytest.approx(5e-6 * 480 / 512) and schedule.min_lr == schedule.peak
    lrs = [schedule.at(s) for s in range(50, 3000, 100)]
    assert max(lrs) <= schedule.peak * (1 + 1e-12)


def test_optimizer_leaves_norms_biases_and_tokens_without_weight_decay() -> None:
    config = recipes.get("demo_deit_tiny_distill")
    model = config.model.build()
    optimizer = build_optimizer(model, config, peak_lr=3e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.0, config.optim.weight_decay}
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= groups[0.0]
    assert {"blocks.0.attn.qkv.weight", "head.weight", "head_dist.weight"} <= groups[config.optim.weight_decay]
    assert type(optimizer).__name__ == "AdamW" and all(g["lr"] == 3e-3 for g in optimizer.param_groups)
    lamb = build_optimizer(model, apply_overrides(config, ["optim.name=lamb"]), peak_lr=1e-3)
    sgd = build_optimizer(model, apply_overrides(config, ["optim.name=sgd"]), peak_lr=1e-3)
    assert type(lamb).__name__ == "Lamb" and type(sgd).__name__ == "SGD"


def test_ema_follows_the_model_with_the_configured_decay() -> None:
    from trainer.optim import build_ema

    config = apply_overrides(recipes.get("demo_deit_tiny"), ["ema.enabled=true", "ema.decay=0.5"])
    model = torch.nn.Linear(2, 2)
    ema = build_ema(model, config)
    assert build_ema(model, recipes.get("demo_deit_tiny")) is None  # off by default (DeiT Table 7)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, before + 0.5)


def test_s3_storage_gets_a_pyarrow_filesystem_at_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.run import _storage

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    path, fs = _storage("s3://bucket/runs")
    assert path == "bucket/runs" and type(fs).__name__ == "S3FileSystem"
    assert _storage("/abs/runs") == ("/abs/runs", None)


def test_a_checkpoint_of_another_worker_count_is_refused() -> None:
    from trainer.checkpoint import CheckpointError, TrainState
    from trainer.worker import _check_restored

    config = recipes.get("demo_deit_tiny")
    state = TrainState(step=5, epoch=0, model={}, loader={"0": {}, "1": {}, "2": {}, "3": {}})
    with pytest.raises(CheckpointError, match="written by 4 workers, this run has 2.*scaling.num_workers=4"):
        _check_restored(state, config, rank=0, world=2)


def test_worker_config_round_trips_through_json() -> None:
    config = recipes.get("demo_deit_tiny_distill")
    options = RunOptions(name="x", tracking_uri="http://127.0.0.1:1", fault={"rank": 1, "step": 3, "marker": "/m"})
    back = decode(json.loads(json.dumps(encode(config, options))))
    assert back == (config, options)
    loss = loss_config(config)
    assert (loss.kind, loss.label_smoothing, loss.base) == ("hard", config.data.mix.label_smoothing, "ce")


def test_unreachable_tracking_server_never_blocks_training() -> None:
    import socket

    from trainer.tracking import Tracker, TrackingSpec

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracker = Tracker(TrackingSpec(tracking_uri=f"http://127.0.0.1:{port}", experiment="e", run_name="r",
                                   params={"a": "1"}))
    start = time.monotonic()
    for step in range(200):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert time.monotonic() - start < 0.5, "logging must return at once"
    assert tracker.close(timeout=60) is False  # it warned and gave up; nothing raised
    assert tracker.failed and tracker.run_id is None


def test_cli_refuses_unbuilt_shards_before_starting_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "trainer.main", "demo_deit_tiny", f"data.train_url={tmp_path}",
                          f"data.val_url={tmp_path}", "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "split 'train' is not built" in out.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- Ray runs

dali = pytest.mark.dali
STEPS = 12  # 2 epochs of 400 // 64 = 6 steps


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """400 train / 100 val digit images (32 px, 10 classes) built into real shards."""
    pytest.importorskip("nvidia.dali")
    from pipeline.build import BuildConfig, build_shards
    from pipeline.demo import write_digits_tree
    from pipeline.storage import Location

    root = tmp_path_factory.mktemp("digits")
    write_digits_tree(root / "src", size=32)
    for split, keep in (("train", 40), ("val", 10)):
        for folder in sorted((root / "src" / split).iterdir()):
            for file in sorted(folder.iterdir())[keep:]:
                file.unlink()
        build_shards(BuildConfig(src=str(root / "src" / split), dst=Location(str(root / "shards")), split=split,
                                 shard_bytes=60_000, workers=1))
    return str(root / "shards")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo teacher (resnet10t, 10 classes) with random weights, saved as a plain state_dict file."""
    torch.manual_seed(1)
    teacher = recipes.get("demo_teacher").model.build()
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.save(teacher.state_dict(), path)
    return str(path)


def _config(digits: str, teacher_file: str) -> TrainConfig:
    return apply_overrides(recipes.get("demo_deit_tiny_distill"), [
        f"data.train_url={digits}", f"data.val_url={digits}", "schedule.epochs=2", "checkpoint.every_n_steps=4",
        "checkpoint.keep=3", "tracking.log_every_n_steps=2", "tracking.experiment=test-trainer",
        "tracking.system_metrics_every_s=1",
        f"distill.teacher.pretrained_path={teacher_file}",
    ])


@dataclass
class Ran:
    result: Any
    run_dir: Path
    keys: dict[int, dict[int, list[list[str]]]]  # rank -> step -> every logged key list (one per attempt)
    seconds: float


def _train(tmp: Path, name: str, digits: str, teacher_file: str, tracking_uri: str, overrides: tuple[str, ...] = (),
           **options: Any) -> Ran:
    from trainer.run import run

    keys_dir = tmp / f"keys-{name}"
    keys_dir.mkdir()
    start = time.monotonic()
    config = apply_overrides(_config(digits, teacher_file), list(overrides))
    result = run(config, storage_path=str(tmp / "storage"), name=name, max_failures=1,
                 options=RunOptions(tracking_uri=tracking_uri, loader_threads=2, dali_threads=1,
                                    key_log_dir=str(keys_dir), **options))
    seconds = time.monotonic() - start
    keys: dict[int, dict[int, list[list[str]]]] = {}
    for rank in (0, 1):
        per_step: dict[int, list[list[str]]] = defaultdict(list)
        for line in (keys_dir / f"keys-rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            per_step[entry["step"]].append(entry["keys"])
        keys[rank] = dict(per_step)
    print(f"run {name}: {seconds:.1f} s, worker timing {result.return_value.get('timing')}")
    return Ran(result, tmp / "storage" / name, keys, seconds)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, digits: str, teacher_file: str, local_ray: Any,
              mlflow_server: Any) -> Ran:
    """The uninterrupted run, logging to the real MLflow server."""
    return _train(tmp_path_factory.mktemp("reference"), "reference", digits, teacher_file, mlflow_server.tracking_uri)


@dali
def test_two_workers_train_a_distilled_student(reference: Ran, digits: str) -> None:
    from pipeline.storage import Location
    from pipeline.stream import ShardSet
    from trainer.checkpoint import latest_checkpoint, load_checkpoint

    summary = reference.result.return_value
    history = summary["history"]
    assert [h["step"] for h in history] == list(range(2, STEPS + 1, 2))
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.3, f"the loss does not go down: {losses}"
    for h in history:
        assert h["img_per_s"] > 0 and 0 <= h["data_wait_frac"] < 1 and h["loss_distill"] > 0
        assert h["loader/corrupt_samples"] == 0 and h["loader/substituted"] == 0
    assert history[0]["lr"] < history[2]["lr"]  # warmup over the first epoch, then cosine down
    assert history[-1]["lr"] < history[2]["lr"]
    # eval at each epoch end: class head, distillation head and the fused classifier, on all 100 val images
    metrics = reference.result.metrics
    assert metrics["step"] == STEPS and metrics["eval/samples"] == 100
    for name in ("eval/top1", "eval/top5", "eval/dist_top1", "eval/dist_top5", "eval/fused_top1", "eval/fused_top5"):
        assert 0 <= metrics[name] <= 100
    assert metrics["eval/top5"] >= metrics["eval/top1"]
    # checkpoints in the storage path: Ray keeps checkpoint.keep=3 of those at 4, 6, 8, 12
    kept = sorted(p.name for p in reference.run_dir.glob("step-*"))
    assert kept == ["step-00000006", "step-00000008", "step-00000012"]
    assert (reference.run_dir / "checkpoint_manager_snapshot.json").is_file()
    fingerprint = ShardSet.open(Location(digits), "train").fingerprint
    state = load_checkpoint(latest_checkpoint(reference.run_dir), expect_fingerprint=fingerprint)
    assert state.step == STEPS and state.epoch == 2 and set(state.loader) == {"0", "1"}
    assert state.loader["1"]["stream"]["rank"] == 1 and state.loader["1"]["step"] == STEPS
    assert not any(k.startswith("module.") for k in state.model)  # the bare model, not DDP's wrapper
    assert summary["mlflow_run_id"] and state.extra["mlflow_run_id"] == summary["mlflow_run_id"]
    # both ranks trained on disjoint images, 10 images x 3 views each per step
    for step in range(STEPS):
        a, b = reference.keys[0][step][0], reference.keys[1][step][0]
        assert len(a) == len(b) == 30 and not set(a) & set(b)


@dali
def test_mlflow_server_gets_params_metrics_and_artifacts(reference: Ran, mlflow_server: Any, digits: str,
                                                         teacher_file: str) -> None:
    from mlflow import MlflowClient

    from pipeline.storage import Location
    from pipeline.stream import ShardSet

    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.get_run(reference.result.return_value["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "reference"
    params = run.data.params
    assert params["model.name"] == "deit_tiny_distilled_patch16_224" and params["data.batch_size"] == "64"
    assert params["distill.teacher.pretrained_path"] == teacher_file and len(params) > 80
    tags = run.data.tags
    assert tags["dataset.fingerprint"] == ShardSet.open(Location(digits), "train").fingerprint
    assert tags["teacher"] == "resnet10t@32" and len(tags["teacher.sha256"]) == 64 and tags["code_version"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(2, STEPS + 1, 2))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/fused_top1")] == [6, 12]
    assert {"data_wait_frac", "img_per_s", "lr", "loader/substituted"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.json" in artifacts
    plots = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "plots")}
    assert set(plots) == {"plots/training.png", "plots/throughput.png"} and min(plots.values()) > 5000
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in models] == ["model"]  # the final student, mlflow.pytorch.log_model
    final = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert set(final) == {"checkpoint/state.pt", "checkpoint/meta.json", "checkpoint/checksums.json"}
    written = reference.run_dir / f"step-{STEPS:08d}"
    assert final["checkpoint/state.pt"] == (written / "state.pt").stat().st_size  # the final one
    assert (reference.run_dir / "tracking.json").is_file()


EVAL_KEYS = ("eval/top1", "eval/top5", "eval/dist_top1", "eval/dist_top5", "eval/fused_top1", "eval/fused_top5")


@dali
def test_the_evaluate_command_gives_the_trainers_last_eval(reference: Ran, digits: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m trainer.evaluate` on the run folder: the final checkpoint's weights (step 12, evaluated by
    the trainer at that epoch's end on 2 ranks), evaluated in this process on all 100 val images."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.evaluate import main

    assert main(["demo_deit_tiny_distill", str(reference.run_dir), f"data.val_url={digits}", "--batch-size", "32",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    trained = reference.result.metrics
    assert result["metrics"]["eval/samples"] == trained["eval/samples"] == 100 and result["ema"] is False
    for key in EVAL_KEYS:  # the same images, weights and transform; other batches than the two ranks' halves
        assert abs(result["metrics"][key] - trained[key]) <= 1.0 + 1e-4, (key, result["metrics"], trained)
    checksums = json.loads((Path(latest_checkpoint(reference.run_dir)) / "checksums.json").read_text())
    assert result["sha256"] == checksums["files"]["state.pt"]
    # the weights of another class count, and EMA weights the run never kept: one error line each, exit 2
    assert main(["demo_deit_tiny_distill", str(reference.run_dir), f"data.val_url={digits}", "--ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err
    # weights that fine-tuning adapts, which an evaluation must refuse: another class count, another
    # resolution, weights the model has no place for
    refused = {"classes": (["model.num_classes=7"], "model.num_classes"),
               "resolution": (["model.img_size=64", "data.augment.image_size=64"], "another resolution"),
               "unexpected": ([], "has no place for")}
    for name, (overrides, words) in refused.items():
        weights = apply_overrides(recipes.get("demo_deit_tiny_distill"), overrides).model.build().state_dict()
        if name == "unexpected":
            weights["head.extra"] = torch.zeros(3)
        torch.save(weights, tmp_path / f"{name}.pth")
        assert main(["demo_deit_tiny_distill", str(tmp_path / f"{name}.pth"), f"data.val_url={digits}"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: {tmp_path / name}.pth") and words in last, (name, last)
    assert main(["demo_deit_tiny_distill", str(reference.run_dir), "data.val_url=" + str(tmp_path / "none")]) == 2
    assert "nothing is there" in capsys.readouterr().err
    # the command's own error class, from the real command line: one line, no traceback
    out = subprocess.run([sys.executable, "-m", "trainer.evaluate", "demo_deit_tiny_distill", str(reference.run_dir),
                          f"data.val_url={digits}", "--device", "xpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: --device xpu: give cpu, cuda or cuda:N", out.stderr


CHECKPOINT_STEPS = (4, 6, 8, 12)  # every_n_steps=4 and each epoch's end (6, 12)
# (rank, step, background): a fixed one with checkpoints written on the training thread, and a random step
# of each rank from seeded draws (several seeds, issue 7) with checkpoints written in the background
FAULTS = [(1, 10, False), (0, random.Random(7).choice([5, 7, 9, 11]), True),
          (1, random.Random(13).choice([3, 5, 7, 9, 11]), True)]


@dali
@pytest.mark.slow
@pytest.mark.parametrize(("rank", "step", "background"), FAULTS,
                         ids=[f"rank{r}-step{s}{'-background' if b else ''}" for r, s, b in FAULTS])
def test_worker_killed_mid_epoch_resumes_on_the_same_samples(reference: Ran, tmp_path: Path, digits: str,
                                                             teacher_file: str, mlflow_server: Any, rank: int,
                                                             step: int, background: bool) -> None:
    """A worker exits hard after ``step``; with max_failures=1 Ray restarts both workers from the latest
    registered checkpoint, and the run finishes on the reference's samples, with the reference's weights.

    Written on the training thread, the latest checkpoint before the failure is registered before training
    goes on, so the run restarts from it. Written in the background, a failure that comes while the newest
    one is still being written restarts from the one before it: exactly as well, a few steps earlier."""
    from trainer.checkpoint import latest_checkpoint, load_checkpoint

    marker = tmp_path / "fault-marker"
    ran = _train(tmp_path, f"fault-{rank}-{step}", digits, teacher_file, mlflow_server.tracking_uri,
                 overrides=(f"checkpoint.background={str(background).lower()}",),
                 fault={"rank": rank, "step": step, "marker": str(marker)})
    assert marker.is_file(), "the fault hook did not fire"
    before = [None, *(c for c in CHECKPOINT_STEPS if c <= step)]  # None: from scratch
    summary = ran.result.return_value
    restored = summary["restored_from"]
    assert restored in (before[-2:] if background else before[-1:]), (restored, before)
    assert ran.result.metrics["step"] == STEPS
    for r in (0, 1):
        assert sorted(ran.keys[r]) == list(range(STEPS))
        for s in range(STEPS):
            attempts = ran.keys[r][s]
            # steps restored..step-1 were trained before the failure and again after the restart
            assert len(attempts) == (2 if (restored or 0) <= s < step else 1), (r, s, len(attempts))
            for keys in attempts:
                assert keys == reference.keys[r][s][0], f"rank {r} step {s} trained other samples"
    # the same samples, augmentations and RNG streams: the same final weights (CPU, up to float summation)
    final = load_checkpoint(latest_checkpoint(ran.run_dir)).model
    expected = load_checkpoint(latest_checkpoint(reference.run_dir)).model
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(final[name].float(), tensor.float(), rtol=1e-4, atol=1e-5), name
    # one MLflow run, continued after the restart
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("test-trainer")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = 'fault-{rank}-{step}'")
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["distillery.resumed_at_step"] == str(restored)
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert steps == set(range(2, STEPS + 1, 2))


@dali
def test_distillation_from_the_teacher_cache(tmp_path: Path, digits: str, teacher_file: str, local_ray: Any) -> None:
    """A cache built with `teacher-cache build` (logit maps, or a replay cache of the run's crops) feeds the
    distillation head; a cache of another teacher, or of other crops, is refused before any worker starts."""
    from pipeline.storage import Location
    from teacher_cache.build import CacheBuildConfig, build_cache
    from teacher_cache.cache import CacheMismatch
    from teacher_cache.teacher import TeacherSpec
    from trainer.run import run

    cache = str(tmp_path / "cache")
    build_cache(CacheBuildConfig(shards=Location(digits), out=Location(cache), topk=4, workers=1,
                                 teacher=TeacherSpec("resnet10t", teacher_file, 10, 64)))
    config = apply_overrides(_config(digits, teacher_file), ["distill.source=cache", f"distill.cache_url={cache}",
                                                             "distill.teacher.img_size=64",  # the cache's
                                                             "schedule.epochs=1", "schedule.warmup_epochs=0"])
    result = run(config, storage_path=str(tmp_path / "storage"), name="cached", max_failures=0,
                 options=RunOptions(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", loader_threads=2, dali_threads=1))
    summary = result.return_value
    assert summary["step"] == 400 // 64 and summary["history"]
    assert all(h["loss_distill"] > 0 and h["loss"] == h["loss"] for h in summary["history"])
    parts = len(list(Path(cache).glob("train-*.parquet")))  # each read once by a worker, whatever the steps
    assert 0 < summary["history"][-1]["teacher_cache/parts_read"] <= parts
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(teacher_file, weights_only=True).items()}, other)
    with pytest.raises(CacheMismatch, match="weights_sha256"):
        run(apply_overrides(config, [f"distill.teacher.pretrained_path={other}"]), storage_path=str(tmp_path / "s2"),
            name="refused")
    with pytest.raises(CacheMismatch, match="resolution=64, this run asks for 32"):
        run(apply_overrides(config, ["distill.teacher.img_size=32"]), storage_path=str(tmp_path / "s3"), name="res")
    # a replay cache of the run's own crops: the distillation head learns the teacher's outputs on them
    replay = str(tmp_path / "replay")
    replayed = apply_overrides(config, [f"distill.cache_url={replay}", "distill.teacher.img_size=32",
                                        "data.augment.replay_views=4", "data.augment.replay_seed=1"])
    build_cache(CacheBuildConfig(shards=Location(digits), out=Location(replay), topk=4, workers=0, views=4, seed=1,
                                 augment=replayed.data.augment, teacher=TeacherSpec("resnet10t", teacher_file, 10, 32)))
    result = run(replayed, storage_path=str(tmp_path / "s4"), name="replayed", max_failures=0,
                 options=RunOptions(tracking_uri="off", loader_threads=2, dali_threads=1))
    summary = result.return_value
    assert summary["step"] == 400 // 64 and all(h["loss_distill"] > 0 for h in summary["history"])
    with pytest.raises(CacheMismatch, match="holds logit maps, this run replays crops"):
        run(apply_overrides(replayed, [f"distill.cache_url={cache}", "distill.teacher.img_size=64"]),
            storage_path=str(tmp_path / "s5"), name="maps")


@dali
@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_the_one_before(tmp_path: Path, digits: str, teacher_file: str,
                                                              local_ray: Any) -> None:
    """The run is continued (same name) after its newest checkpoint got a flipped bit: Ray hands the workers
    that checkpoint, they find it corrupt (checksums) and resume from the intact one before it."""
    from trainer.run import run

    config = apply_overrides(_config(digits, teacher_file), ["schedule.epochs=1", "schedule.warmup_epochs=0"])
    options = RunOptions(tracking_uri="off", loader_threads=2, dali_threads=1)
    first = run(config, storage_path=str(tmp_path / "storage"), name="corrupt", options=options)
    assert first.metrics["step"] == 6  # checkpoints at steps 4 and 6
    state = tmp_path / "storage" / "corrupt" / "step-00000006" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    again = run(config, storage_path=str(tmp_path / "storage"), name="corrupt", options=options)
    assert again.return_value["restored_from"] == 4 and again.metrics["step"] == 6
    assert [h["step"] for h in again.return_value["history"]] == [6]  # steps 4, 5 trained again; logged at 6
    # a finished run started again trains nothing and still reports its last evaluation (the demo prints it)
    done = run(config, storage_path=str(tmp_path / "storage"), name="corrupt", options=options)
    assert done.return_value["restored_from"] == 6 and done.return_value["history"] == []
    assert done.return_value["eval"] == again.return_value["eval"] and "eval/top1" in done.return_value["eval"]


@dali
@pytest.mark.slow
def test_remote_teacher_actors_give_the_online_teachers_training(reference: Ran, tmp_path: Path, digits: str,
                                                                  teacher_file: str) -> None:
    """distill.source=remote: the teacher runs in a Ray actor shared by both workers, fed one step ahead;
    the run trains on the same labels, so its losses are the online teacher's run's, step for step."""
    from trainer.run import run

    config = apply_overrides(_config(digits, teacher_file), ["distill.source=remote", "distill.remote_actors=1"])
    result = run(config, storage_path=str(tmp_path / "storage"), name="remote",
                 options=RunOptions(tracking_uri="off", loader_threads=2, dali_threads=1))
    ours = [(h["step"], h["loss"], h["loss_distill"]) for h in result.return_value["history"]]
    theirs = [(h["step"], h["loss"], h["loss_distill"]) for h in reference.result.return_value["history"]]
    assert [s for s, _, _ in ours] == [s for s, _, _ in theirs]
    for (step, loss, distill), (_, ref_loss, ref_distill) in zip(ours, theirs, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-4) and distill == pytest.approx(ref_distill, rel=1e-4), step
    assert result.metrics["eval/fused_top1"] == pytest.approx(reference.result.metrics["eval/fused_top1"], abs=1.01)


@dali
def test_remote_teacher_logits_equal_the_online_teachers(teacher_file: str, local_ray: Any) -> None:
    import torch

    from trainer.remote_teacher import RemoteTeacher
    from trainer.worker import OnlineTeacher, build_teacher

    config = apply_overrides(recipes.get("demo_deit_tiny_distill"),
                             [f"distill.teacher.pretrained_path={teacher_file}", "distill.source=remote"])
    remote, tags = build_teacher(config, torch.device("cpu"), run_name="unit")
    assert isinstance(remote, RemoteTeacher) and len(tags["teacher.sha256"]) == 64
    online, online_tags = build_teacher(apply_overrides(config, ["distill.source=online"]), torch.device("cpu"))
    assert isinstance(online, OnlineTeacher) and online_tags["teacher.sha256"] == tags["teacher.sha256"]
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = online(x, None, None)
    remote.submit(x, step=3)
    from pipeline.loader import Batch

    batch = Batch(x, torch.zeros(6), [""] * 6, torch.zeros(6, 4), torch.zeros(6), 3, None, None)
    assert torch.allclose(remote(x, batch, None), expected, atol=1e-5)  # the one sent ahead for step 3
    assert torch.allclose(remote(x, None, None), expected, atol=1e-5)  # and one sent on the spot
    assert not remote._pending


def test_a_compiled_online_teacher_gives_the_eager_teachers_logits(teacher_file: str) -> None:
    """distill.compile_teacher (issue 4: the online teacher "optionally compiled"): the same teacher, weights
    and identity, compiled with runtime.compile_backend (aot_eager here: no C++ compiler needed)."""
    from trainer.worker import OnlineTeacher, build_teacher

    config = apply_overrides(recipes.get("demo_deit_tiny_distill"), [f"distill.teacher.pretrained_path={teacher_file}",
                                                                    "runtime.compile_backend=aot_eager"])
    eager, eager_tags = build_teacher(config, torch.device("cpu"))
    compiled, tags = build_teacher(apply_overrides(config, ["distill.compile_teacher=true"]), torch.device("cpu"))
    assert isinstance(compiled, OnlineTeacher) and hasattr(compiled.model, "_orig_mod")
    assert not hasattr(eager.model, "_orig_mod") and tags == eager_tags
    for views in (6, 6, 4):  # a smaller last batch recompiles and still answers
        x = torch.randn(views, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(compiled(x, None, None), eager(x, None, None), atol=1e-5)
    with pytest.raises(ConfigError, match=r"distill\.compile_teacher=true but distill\.source=cache"):
        apply_overrides(config, ["distill.compile_teacher=true", "distill.source=cache",
                                 "distill.cache_url=/tmp/x"]).validate()


def test_remote_teacher_submit_does_not_wait_for_the_send() -> None:
    """The copy to host memory and Ray's serialisation happen on the sender thread, in submission order:
    ``submit`` returns while the send of its batch is still blocked (a stand-in actor handle holds it)."""
    import threading

    from trainer.remote_teacher import RemoteTeacher

    release, sent = threading.Event(), []

    class Method:
        def remote(self, x: torch.Tensor) -> str:
            assert threading.current_thread() is not threading.main_thread()
            release.wait(timeout=30)
            sent.append(x)
            return f"ref-{len(sent)}"

    class Actor:
        logits = Method()

    remote = RemoteTeacher(Actor(), torch.bfloat16)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    for step, x in enumerate(batches):
        remote.submit(x, step)  # returns although the first send is blocked
    assert not sent and all(not f.done() for f in remote._pending.values())
    release.set()
    assert [remote._pending[s].result(timeout=30) for s in range(3)] == ["ref-1", "ref-2", "ref-3"]
    assert [t.dtype for t in sent] == [torch.bfloat16] * 3  # cast to the transport dtype, on host
    assert all(torch.equal(t, x.to(torch.bfloat16)) for t, x in zip(sent, batches, strict=True))  # in order

    class Broken:
        class logits:  # noqa: N801 - an actor handle's method
            @staticmethod
            def remote(x: torch.Tensor) -> str:
                raise ConnectionError("actor gone")

    from pipeline.loader import Batch

    broken = RemoteTeacher(Broken(), torch.float32)
    broken.submit(batches[0], step=5)
    batch = Batch(batches[0], torch.zeros(4), [""] * 4, torch.zeros(4, 4), torch.zeros(4), 5, None, None)
    with pytest.raises(ConnectionError, match="actor gone"):  # the send's error reaches the step that needs it
        broken(batches[0], batch, None)
    broken.close()
    remote.close()
    with pytest.raises(RuntimeError):  # closed: nothing more is sent
        remote.submit(batches[0], step=9)


def test_a_teacher_actor_compiles_its_teacher_when_asked(teacher_file: str) -> None:
    """distill.compile_teacher reaches each remote actor (``TeacherActor(..., compile_backend)``), built here
    without Ray: the compiled actor gives the eager actor's logits."""
    import dataclasses

    from trainer.remote_teacher import TeacherActor

    teacher = dataclasses.asdict(_demo_teacher(teacher_file))
    eager, compiled = TeacherActor(teacher, False, False), TeacherActor(teacher, False, False, "aot_eager")
    assert hasattr(compiled.model, "_orig_mod") and not hasattr(eager.model, "_orig_mod")
    assert compiled.identity() == eager.identity()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(compiled.logits(x), eager.logits(x), atol=1e-5)


def _demo_teacher(teacher_file: str):
    """The demo recipe's teacher ModelConfig with the test's weights file."""
    import dataclasses

    return dataclasses.replace(recipes.get("demo_deit_tiny_distill").distill.teacher, pretrained_path=teacher_file)


@dali
@pytest.mark.slow
def test_an_elastic_run_resumes_a_checkpoint_of_another_worker_count(reference: Ran, tmp_path: Path, digits: str,
                                                                     teacher_file: str) -> None:
    """scaling.min_workers > 0: a checkpoint of 2 workers resumes on 1 (as an elastic group that shrank):
    the same step and schedule, the loader at the start of the next pass of the 1-worker order."""
    from pipeline.loader import plan_batch
    from pipeline.order import per_rank
    from pipeline.storage import Location
    from pipeline.stream import SampleStream, ShardSet
    from trainer.run import run

    config = apply_overrides(_config(digits, teacher_file), ["scaling.num_workers=1", "scaling.min_workers=1"])
    checkpoint = reference.run_dir / "step-00000008"
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    result = run(config, storage_path=str(tmp_path / "storage"), name="elastic",
                 options=RunOptions(tracking_uri="off", loader_threads=2, dali_threads=1, resume=str(checkpoint),
                                    key_log_dir=str(keys_dir)))
    assert result.return_value["restored_from"] == 8 and result.metrics["step"] == STEPS
    assert [h["step"] for h in result.return_value["history"]] == [10, 12]
    shards = ShardSet.open(Location(digits), "train")
    assert 8 * plan_batch(64, 2, 3) < per_rank(shards.counts, 2), "the checkpoint is inside pass 0"
    first = json.loads((keys_dir / "keys-rank0.jsonl").read_text().splitlines()[0])
    images = plan_batch(64, 1, 3, even=config.data.mix.enabled)
    expected = SampleStream(shards, config.data.stream, world=1, rank=0,
                            position=per_rank(shards.counts, 1)).take(images)
    # the step's views come in a seeded random order (Mixup partners), each image's 3 views in the step
    assert first["step"] == 8 and sorted(first["keys"]) == sorted(s.key for s in expected for _ in range(3))
    with pytest.raises(Exception, match="make the run elastic"):  # without min_workers: refused
        run(apply_overrides(config, ["scaling.min_workers=0"]), storage_path=str(tmp_path / "storage2"),
            name="fixed", options=RunOptions(tracking_uri="off", loader_threads=2, dali_threads=1,
                                             resume=str(checkpoint)))


@dali
def test_a_teacher_actor_that_cannot_be_placed_is_a_clear_error(teacher_file: str, local_ray: Any) -> None:
    import ray

    from trainer.remote_teacher import RemoteTeacher

    config = apply_overrides(recipes.get("demo_deit_tiny_distill"),
                             [f"distill.teacher.pretrained_path={teacher_file}", "distill.source=remote",
                              "distill.remote_actors=2"])
    remote = RemoteTeacher.connect(config, "unplaceable", 0, use_gpu=True)  # this cluster has no GPU
    try:
        with pytest.raises(RuntimeError, match="2 teacher actors need 2 GPUs besides the 2 the workers take"):
            remote.identity(timeout=3)
    finally:
        ray.kill(remote.actor)


def test_a_gpu_run_without_the_gpus_is_refused_on_this_machines_ray_and_warned_about_on_a_cluster(
        local_ray: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paper recipe (scaling.use_gpu) on a machine without GPUs would wait for them forever."""
    from trainer import run
    from trainer.run import check_gpus

    config = apply_overrides(recipes.get("demo_deit_tiny_distill"), ["scaling.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"scaling.use_gpu=true needs 2 GPUs \(2 workers\); the Ray cluster has 0: "
                                          r"pass scaling.use_gpu=false"):
        check_gpus(config)  # the fixture's Ray: this machine's, its GCS on 127.0.0.1
    elastic = apply_overrides(config, ["scaling.num_workers=4", "scaling.min_workers=1"])
    with pytest.raises(ConfigError, match=r"needs 1 GPU \(1 worker\)"):  # an elastic run starts with its minimum
        check_gpus(elastic)
    remote = apply_overrides(config, ["distill.source=remote", "distill.remote_actors=3"])
    with pytest.raises(ConfigError, match=r"needs 4 GPUs \(2 workers and 2 teacher actors\)"):  # 3rd: never asked
        check_gpus(remote)
    monkeypatch.setattr(run, "_cluster_may_grow", lambda: True)
    with caplog.at_level("WARNING", logger="trainer.run"):
        check_gpus(config)
    assert "Ray Train waits until the cluster has them" in caplog.text
    check_gpus(apply_overrides(config, ["scaling.use_gpu=false"]))


def test_rays_state_api_asks_this_runs_ray_when_another_ray_runs_on_the_machine(local_ray: Any, ray_head: Any) -> None:
    """Ray Train's placement-group cleaner polls the state API from Ray's own processes; without an address
    it looks for the Ray on the machine, finds `infra.local up`'s head beside the trainer's, and warns
    ("multiple Ray instances") every few seconds for the whole run."""
    import ray

    @ray.remote(num_cpus=0)
    def ask() -> tuple[str, int]:
        from ray.util.state import list_nodes

        return os.environ.get("RAY_API_SERVER_ADDRESS", ""), len(list_nodes())

    address, nodes = ray.get(ask.remote(), timeout=60)  # without the address: RayStateApiException here
    assert address == f"http://{ray._private.worker.get_dashboard_url()}" != ray_head.dashboard_url
    assert nodes == 1
    assert "RAY_API_SERVER_ADDRESS" not in os.environ, "it would override `ray job submit --address` from here"


def test_checkpoints_go_to_storage_else_checkpoint_url_else_the_clusters_root_else_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainer.run import storage_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLERY_STORAGE", raising=False)
    config = recipes.get("demo_deit_tiny")
    assert storage_root(config) == str(tmp_path / "runs")
    monkeypatch.setenv("DISTILLERY_STORAGE", "s3://bucket/runs")
    assert storage_root(config) == "s3://bucket/runs"
    assert storage_root(apply_overrides(config, ["checkpoint.url=ckpt"])) == str(tmp_path / "ckpt")
    assert storage_root(config, "gs://other/runs") == "gs://other/runs"


def test_the_embedded_rays_object_store_is_sized_for_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.run import local_object_store_bytes

    monkeypatch.delenv("DISTILLERY_RAY_OBJECT_STORE_MB", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_object_store_bytes() == 256 << 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_object_store_bytes() == 4096 << 20
    monkeypatch.setenv("DISTILLERY_RAY_OBJECT_STORE_MB", "1024")
    assert local_object_store_bytes() == 1024 << 20


def test_a_local_mlflow_file_with_remote_storage_or_a_cluster_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.run import local_tracking_warning

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("DISTILLERY_RAY_GCS_ADDRESS", raising=False)
    assert local_tracking_warning("sqlite:////runs/x/mlruns.db", "/runs/x") is None
    assert local_tracking_warning("http://127.0.0.1:5000", "s3://bucket/runs/x") is None
    said = local_tracking_warning("sqlite:////tmp/mlruns.db", "s3://bucket/runs/x")
    assert said is not None and "checkpoints on s3://bucket/runs/x" in said and "MLFLOW_TRACKING_URI" in said
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert "a Ray cluster" in (local_tracking_warning("sqlite:////runs/x/mlruns.db", "/runs/x") or "")


@pytest.mark.parametrize("source", ["online", "constant"])
def test_micro_batches_make_the_same_gradient_as_the_whole_batch(source: str) -> None:
    """optim.micro_batches=3 runs a step's 30 views as 3 forward/backward passes: the gradient the update
    uses (fp32 summation order aside) and the logged losses are those of one pass over the batch."""
    import timm

    from trainer.worker import OnlineTeacher, _ConstantTeacher, local_parts, optimizer_step, synthetic_batches

    base = apply_overrides(recipes.get("demo_deit_tiny_distill"), [  # with the whole DeiT augmentation
        "model.drop_path=0.0", "data.batch_size=30", "data.mix.prob=1.0", "data.mix.mixup_alpha=0.8",
        "data.mix.cutmix_alpha=1.0", "data.augment.auto_augment=rand-m9-mstd0.5-inc1", "data.augment.reprob=0.25"])
    torch.manual_seed(1)
    teacher_model = timm.create_model("resnet10t", num_classes=10).eval()
    teacher = OnlineTeacher(teacher_model) if source == "online" else _ConstantTeacher(torch.randn(30, 10))
    batch = next(synthetic_batches(base, torch.device("cpu"), 10, torch.Generator().manual_seed(0)))
    results = []
    for parts in (1, 3):
        config = apply_overrides(base, [f"optim.micro_batches={parts}"])
        torch.manual_seed(0)
        p = local_parts(config, torch.device("cpu"), teacher)
        aug = p.augment.apply(batch.views, batch.labels, copy.deepcopy(batch.rng))  # the same draws twice
        assert aug.mix.lam < 1.0
        terms = optimizer_step(p, aug.x, aug.targets, batch, aug.mix)
        results.append((terms.detached(), {k: v.grad.clone() for k, v in p.model.named_parameters()
                                           if v.grad is not None}))
    (whole, grads_whole), (pieces, grads_pieces) = results
    assert whole == pytest.approx(pieces, rel=1e-5) and whole["loss_distill"] > 0
    assert grads_whole.keys() == grads_pieces.keys() and len(grads_whole) > 10
    for name, grad in grads_whole.items():
        assert torch.allclose(grad, grads_pieces[name], rtol=1e-4, atol=1e-7), name
    assert any(float(g.abs().max()) > 0 for g in grads_whole.values())


@dali
@pytest.mark.parametrize("background", [True, False], ids=["background", "on-the-training-thread"])
def test_a_checkpoint_writes_the_state_of_its_step_while_training_goes_on(digits: str, background: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.background (default): checkpoint() returns while the write is still running, the steps
    trained meanwhile change the parameters in place, and the write still holds the state of the
    checkpoint's step. checkpoint.background=false: the write is done when checkpoint() returns."""
    import threading

    from pipeline.loader import TrainLoader
    from pipeline.storage import Location
    from pipeline.stream import ShardSet
    from trainer import worker
    from trainer.background import snapshot

    config = apply_overrides(recipes.get("demo_deit_tiny"), [
        f"data.train_url={digits}", f"data.val_url={digits}", f"checkpoint.background={str(background).lower()}"])
    loader = TrainLoader(ShardSet.open(Location(digits), "train"), config.data, world=1, threads=1, dali_threads=1)
    p = worker.local_parts(config, torch.device("cpu"), loader=loader)
    batches = iter(loader)
    worker.train_step(p, next(batches))
    p.step = 1
    release, written = threading.Event(), []

    def slow_report(parts: Any, metrics: dict[str, float], state: Any) -> None:
        assert (threading.current_thread() is not threading.main_thread()) == background
        if background:
            assert release.wait(60), "the training thread never went on"
        written.append((metrics, snapshot(state)))  # what a write of `state` would hold now

    monkeypatch.setattr(worker, "_report", slow_report)
    at_checkpoint = snapshot({"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
                              "loader": loader.state_dict()})
    worker.checkpoint(p, {"eval/top1": 50.0})
    assert p.writer.busy == background and len(written) == (0 if background else 1)
    worker.train_step(p, next(batches))  # the next step, while the write runs
    p.step = 2
    assert any(not torch.equal(v, at_checkpoint["model"][k]) for k, v in p.model.state_dict().items())
    release.set()
    p.writer.wait()
    [(metrics, state)] = written
    assert metrics == {"eval/top1": 50.0, "step": 1, "epoch": 1 / loader.steps_per_epoch}
    assert state.step == 1 and state.loader == {"0": at_checkpoint["loader"]} and state.extra["eval"] == {}
    assert state.model.keys() == at_checkpoint["model"].keys()
    for name, tensor in at_checkpoint["model"].items():
        assert torch.equal(state.model[name], tensor), name
    moments = [s["exp_avg"] for s in state.optimizer["state"].values()]
    assert moments and all(torch.equal(a, b["exp_avg"]) for a, b in
                           zip(moments, at_checkpoint["optimizer"]["state"].values(), strict=True))
    assert p.timing["checkpoint_stall_s"] > 0


@dali
def test_a_failed_background_write_fails_the_next_checkpoint(digits: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose background write raises (a full disk) is not lost silently: the next
    checkpoint, or the end of the loop, raises the write's own error on the training thread."""
    from pipeline.loader import TrainLoader
    from pipeline.storage import Location
    from pipeline.stream import ShardSet
    from trainer import worker

    config = apply_overrides(recipes.get("demo_deit_tiny"), [f"data.train_url={digits}", f"data.val_url={digits}"])
    loader = TrainLoader(ShardSet.open(Location(digits), "train"), config.data, world=1, threads=1, dali_threads=1)
    p = worker.local_parts(config, torch.device("cpu"), loader=loader)
    calls = []

    def full_disk(parts: Any, metrics: dict[str, float], state: Any) -> None:
        calls.append(state.step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker, "_report", full_disk)
    p.step = 4
    worker.checkpoint(p, {})  # returns: the write runs, and fails, in the background
    p.step = 8
    with pytest.raises(OSError, match="No space left on device"):
        worker.checkpoint(p, {})
    assert calls == [4]  # the second checkpoint was not started on top of the lost one


@pytest.mark.parametrize("micro_batches, scope", [(1, "model"), (2, "model"), (1, "blocks"), (1, "auto")])
def test_a_compiled_student_trains_as_the_eager_one(micro_batches: int, scope: str) -> None:
    """runtime.compile's path (local_parts(compile_model=True), as the worker and bench_gpu build it): the same
    losses step for step as eager, and a checkpoint of the bare model's keys, for both compile scopes (the
    whole model, or each block in place). torch.compile runs with the aot_eager backend here: Dynamo's
    trace and AOTAutograd, without inductor's code generation (a C++ compiler CI need not have;
    runtime.compile_backend)."""
    from torch._dynamo.utils import counters

    from trainer.checkpoint import capture_rng
    from trainer.worker import _ConstantTeacher, local_parts, optimizer_step, synthetic_batches, train_state

    config = apply_overrides(recipes.get("demo_deit_tiny_distill"), [
        "data.batch_size=30", "model.drop_path=0.0", f"optim.micro_batches={micro_batches}",
        "runtime.compile_backend=aot_eager", f"runtime.compile_scope={scope}"])
    batch = next(synthetic_batches(config, torch.device("cpu"), 10, torch.Generator().manual_seed(0)))
    teacher = _ConstantTeacher(torch.randn(30, 10, generator=torch.Generator().manual_seed(1)))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()  # graphs another test compiled for the same blocks would serve these
        counters.clear()
        p = local_parts(config, torch.device("cpu"), teacher, compile_model=compiled)
        per_block = scope != "model"  # auto: drop_path=0, so the blocks are identical
        assert hasattr(p.model, "_orig_mod") == (compiled and not per_block)
        losses = []
        for _ in range(3):
            aug = p.augment.apply(batch.views, batch.labels, copy.deepcopy(batch.rng))
            losses.append(optimizer_step(p, aug.x, aug.targets, batch, aug.mix).detached())
        if compiled and per_block:  # two identical blocks: one graph, no whole-model one
            assert all(b._compiled_call_impl is not None for b in p.model.blocks)
            assert counters["stats"]["unique_graphs"] == 1
        runs.append((losses, train_state(p, [{"loader": {}, "rng": capture_rng()}], copy=True)))
    (eager, eager_state), (compiled_losses, compiled_state) = runs
    for step, (ours, theirs) in enumerate(zip(compiled_losses, eager, strict=True)):
        assert ours == pytest.approx(theirs, rel=1e-5), step
    assert eager[2]["loss"] < eager[0]["loss"]
    assert list(compiled_state.model) == list(eager_state.model) and "cls_token" in compiled_state.model
    for name, tensor in eager_state.model.items():
        assert torch.allclose(compiled_state.model[name], tensor, rtol=1e-4, atol=1e-6), name


def test_blocks_that_differ_all_compile_and_the_slow_compile_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """DeiT's drop-path rate grows block by block, so each block is a graph of its own: all 10 compile
    (none left eager past torch.compile's recompile limit of 8), and the log says why that is slow."""
    from torch._dynamo.utils import counters

    from trainer.worker import block_graphs, compile_blocks, resolve_compile_scope

    config = apply_overrides(recipes.get("demo_deit_tiny"), ["model.depth=10", "model.drop_path=0.1"])
    model = config.model.build().train()
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, "aot_eager") == 10
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 10
    assert "the 10 blocks make 10 distinct graphs" in caplog.text and "model.drop_path_uniform=true" in caplog.text
    assert resolve_compile_scope(model, "auto") == "model" and resolve_compile_scope(model, "blocks") == "blocks"
    uniform = apply_overrides(config, ["model.drop_path_uniform=true"]).model.build().train()
    caplog.clear()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(uniform, "aot_eager")
    uniform(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and "distinct graphs" not in caplog.text
    assert resolve_compile_scope(uniform, "auto") == "blocks"
    cait = apply_overrides(recipes.get("cait_xxs24"), ["model.depth=3", "model.embed_dim=48", "model.img_size=32",
                                                        "model.patch_size=8"]).model.build()
    assert block_graphs(cait) == 2 and resolve_compile_scope(cait, "auto") == "blocks"  # SA and CA blocks


@dali
@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_two_workers_train_a_compiled_student_as_the_eager_run(reference: Ran, tmp_path: Path, digits: str,
                                                                teacher_file: str, scope: str) -> None:
    """runtime.compile=true through Ray Train: DDP around a torch.compile'd student (aot_eager backend,
    see above), or DDP around a student whose blocks are compiled in place, trains the reference's run:
    the same losses at every logged step, and checkpoints of the bare model."""
    from trainer.checkpoint import latest_checkpoint, load_checkpoint
    from trainer.run import run

    config = apply_overrides(_config(digits, teacher_file), ["runtime.compile=true",
                                                             "runtime.compile_backend=aot_eager",
                                                             f"runtime.compile_scope={scope}"])
    result = run(config, storage_path=str(tmp_path / "storage"), name="compiled",
                 options=RunOptions(tracking_uri="off", loader_threads=2, dali_threads=1))
    ours = [(h["step"], h["loss"]) for h in result.return_value["history"]]
    theirs = [(h["step"], h["loss"]) for h in reference.result.return_value["history"]]
    assert [s for s, _ in ours] == [s for s, _ in theirs] and len(ours) == STEPS // 2
    for (step, loss), (_, expected) in zip(ours, theirs, strict=True):
        assert loss == pytest.approx(expected, rel=1e-4), step
    state = load_checkpoint(latest_checkpoint(tmp_path / "storage" / "compiled")).model
    assert state.keys() == load_checkpoint(latest_checkpoint(reference.run_dir)).model.keys()


def test_evaluation_runs_eager_once_compile_ran_and_a_worker_never_imports_dynamo_for_it() -> None:
    """`evaluate_model`'s force_eager stance: applied once torch.compile has run in the process (compiled code
    must not serve evaluation), and not imported before: torch._dynamo costs each Ray worker ~1.7 s."""
    from trainer.worker import _eager_once_compiled

    probe = "import sys, trainer.worker; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]

    graphs: list[Any] = []

    def counting_backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    double_plus_one = torch.compile(lambda x: x * 2 + 1, backend=counting_backend)
    evaluate = _eager_once_compiled(lambda x: double_plus_one(x))
    assert torch.equal(evaluate(torch.ones(3)), torch.full((3,), 3.0)) and graphs == []  # eager: nothing compiled
    assert torch.equal(double_plus_one(torch.ones(3)), torch.full((3,), 3.0)) and len(graphs) == 1
