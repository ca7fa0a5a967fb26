"""Launch one training run on Ray Train: ``run(config, storage_path, name, max_failures, resume)``.

Ray Train 2.60 runs its "V2" implementation by default (``RAY_TRAIN_V2_ENABLED`` unset = on; ``=0``
falls back to the deprecated V1). What that means here:

* ``TorchTrainer(train_loop_per_worker, train_loop_config, scaling_config, run_config)``; ``fit()``
  starts a controller actor that starts ``num_workers`` worker actors (1 CPU each, or 1 GPU each) and
  sets up the torch process group (gloo on CPU, NCCL on GPU).
* A worker that dies or raises fails the whole worker group. The controller's failure policy counts it
  against ``FailureConfig(max_failures)``; while the count is within it, the controller tears the group
  down, starts a new one and hands every worker the latest checkpoint registered with
  ``ray.train.report(..., checkpoint=...)`` (``ray.train.get_checkpoint()``). Beyond it, ``fit()``
  raises ``ray.train.WorkerGroupError`` (a ``TrainingFailedError``).
* Checkpoints land in ``storage_path/name/<checkpoint_dir_name>``; the controller's
  ``checkpoint_manager_snapshot.json`` there lists them. Calling ``run`` again with the same
  ``storage_path`` and ``name`` loads that snapshot, so the new run's workers get its latest checkpoint
  too: that is how a crashed driver or a finished run is continued (``resume_from_checkpoint`` and
  ``Trainer.restore`` are gone in V2). ``resume=`` here is for starting from a checkpoint of *another*
  run (or a copied folder); Ray's own checkpoint wins when there is one.

Ray: ``RAY_ADDRESS`` (a GCS address such as ``127.0.0.1:6379``, as set inside ``ray job submit``) or
``DISTILLERY_RAY_GCS_ADDRESS`` (what ``python -m infra.local`` prints) connects to a running cluster; without
either, a local Ray is started on 127.0.0.1 with enough CPUs for the workers.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.tracking import default_tracking_uri
from trainer.worker import RunOptions, encode, train_loop_per_worker

log = logging.getLogger(__name__)

__all__ = ["run", "preflight", "run_name", "absolute_paths", "code_version", "connect_ray", "check_gpus",
           "storage_root", "DEFAULT_STORAGE", "STORAGE_ENV"]

# where runs go without --storage or checkpoint.url (`storage_root`): a cluster's checkpoint root
# (docs/multinode.md), else a local folder under the current directory
STORAGE_ENV = "DISTILLERY_STORAGE"
DEFAULT_STORAGE = "runs"


def run(config: TrainConfig, storage_path: str | None = None, name: str | None = None, max_failures: int = 0,
        resume: str | None = None, *, options: RunOptions | None = None) -> Any:
    """Train ``config`` on ``config.scaling.num_workers`` Ray Train workers; return Ray's ``Result``.

    ``storage_path``: folder or URL for checkpoints (default: `storage_root`'s);
    ``name``: the run's folder in it (same name = same run, continued from its latest checkpoint);
    ``max_failures``: worker-group restarts allowed (-1: unlimited); ``resume``: a checkpoint (or a folder
    of checkpoints) to start from when this run has none yet. ``options`` carries switches that are not
    part of the recipe (tracking URI, test hooks); its name / run_dir / resume / code version are filled in.
    Raises ``ray.train.TrainingFailedError`` when training fails beyond ``max_failures``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    config = absolute_paths(config).validate(strict=True)
    if resume and "://" not in resume and not os.path.exists(resume):
        from trainer.config import ConfigError

        raise ConfigError([f"--resume {resume}: no such checkpoint or folder of checkpoints"])
    preflight(config)
    name = name or run_name(config)
    storage = storage_root(config, storage_path)
    run_dir = storage.rstrip("/") + "/" + name
    options = options or RunOptions()
    tracking_uri = options.tracking_uri or config.tracking.tracking_uri or default_tracking_uri(
        run_dir if "://" not in run_dir else None)
    if tracking_uri.lower() in ("off", "none"):
        tracking_uri = ""
    elif (warning := local_tracking_warning(tracking_uri, run_dir)) is not None:
        log.warning("%s", warning)
    connect_ray(config.scaling.num_workers)
    check_gpus(config)
    options = replace(options, name=name, run_dir=run_dir, tracking_uri=tracking_uri,
                      resume=_absolute(resume) if resume else options.resume,
                      code_version=options.code_version or code_version(), ray_job_id=options.ray_job_id or _job_id())
    storage_arg, filesystem = _storage(storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=encode(config, options),
        scaling_config=ray.train.ScalingConfig(num_workers=_num_workers(config), use_gpu=config.scaling.use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_arg,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
        ),
    )
    log.info("run %r: %d workers, checkpoints in %s, tracking %s", name, config.scaling.num_workers, run_dir,
             tracking_uri or "off")
    return trainer.fit()


def storage_root(config: TrainConfig, storage_path: str | None = None) -> str:
    """Where a run's folder goes: ``storage_path`` (``--storage``), else ``checkpoint.url``, else
    ``$DISTILLERY_STORAGE`` (a cluster's setting), else ``./runs``; local paths made absolute."""
    return _absolute(storage_path or config.checkpoint.url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE)


def check_splits(config: TrainConfig, sets: list[tuple[str, str]]) -> None:
    """Each (url, split) of ``sets``, and ImageNet-V2 (``data.v2_url``) when given, is built and has the
    model's class count; else a `DatasetError` that says what to do."""
    from pipeline.manifest import DatasetError, read_info
    from pipeline.storage import Location

    if config.data.v2_url:
        sets = [*sets, (config.data.v2_url, "val")]
    for url, split in sets:
        info = read_info(Location(url), split)
        if info.num_classes != config.model.num_classes:
            raise DatasetError(
                f"{url} split {split!r} has {info.num_classes} classes but model.num_classes="
                f"{config.model.num_classes}: set model.num_classes={info.num_classes} (and the teacher's)"
            )


def preflight(config: TrainConfig) -> None:
    """Fail in the driver, before Ray starts, on what the workers would only find later: unbuilt shards, a
    class count the model does not have, weights files that are not there."""
    from pipeline.manifest import DatasetError
    from pipeline.storage import Location

    check_splits(config, [(config.data.train_url, "train"), (config.data.val_url, "val")])
    for field_name, path, model in (("model.pretrained_path", config.model.pretrained_path, config.model),
                                    ("distill.teacher.pretrained_path", config.distill.teacher.pretrained_path,
                                     config.distill.teacher)):
        if config.distill.kind == "none" and field_name.startswith("distill."):
            continue
        from trainer.checkpoint import check_local_weights

        # weights of another architecture: refused here, not in each worker
        check_local_weights(model.build, path, f"{field_name}={path}", DatasetError)
    if config.data.real_labels:
        from trainer.real_labels import load_real_labels

        load_real_labels(config.data.real_labels, Location(config.data.val_url), config.model.num_classes)
    if config.distill.kind != "none" and config.distill.source == "cache":
        from pipeline.stream import ShardSet
        from trainer.worker import build_teacher

        # opens the cache as the workers will: refuses other data, teacher name, classes or weights now
        build_teacher(config, "cpu", ShardSet.open(Location(config.data.train_url), "train"))


def _num_workers(config: TrainConfig) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: a count, or ``(min, max)`` for an elastic run (``scaling.min_workers``)."""
    s = config.scaling
    return (s.min_workers, s.num_workers) if 0 < s.min_workers < s.num_workers else s.num_workers


def run_name(config: TrainConfig) -> str:
    """``tracking.run_name``, else ``<model>-<UTC time>`` (a new run each time)."""
    if config.tracking.run_name:
        return config.tracking.run_name
    return f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local relative paths (shards, weights, checkpoint folder) made absolute: workers run elsewhere."""
    data = replace(config.data, train_url=_absolute(config.data.train_url), val_url=_absolute(config.data.val_url))
    model = replace(config.model, pretrained_path=_absolute(config.model.pretrained_path))
    teacher = replace(config.distill.teacher, pretrained_path=_absolute(config.distill.teacher.pretrained_path))
    distill = replace(config.distill, teacher=teacher, cache_url=_absolute(config.distill.cache_url))
    return replace(config, data=data, model=model, distill=distill)


def _absolute(path: Any) -> Any:
    if not path or "://" in str(path):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def _storage(storage: str) -> tuple[str, Any]:
    """``RunConfig(storage_path, storage_filesystem)``: an S3 URL gets a pyarrow file system pointed at
    ``AWS_ENDPOINT_URL(_S3)`` when one is set (local / MinIO / moto stores); anything else is Ray's."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not storage.startswith(("s3://", "s3a://")) or not endpoint:
        return storage, None
    import pyarrow.fs

    scheme, host = endpoint.split("://", 1) if "://" in endpoint else ("https", endpoint)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return storage.split("://", 1)[1], fs


def connect_ray(num_workers: int, temp_dir: str | None = None) -> None:
    """Join the cluster named by the environment, else start a local Ray on 127.0.0.1 (once per process:
    `infra.raycluster.connect_ray`) with ``max(num_workers, cores)`` CPUs, `local_object_store_bytes` and
    its dashboard: Ray Train V2's placement-group cleaner asks the dashboard's state API whether the
    controller is alive (without it, it logs a warning every few seconds and cannot clean up after a dead
    controller)."""
    from infra.raycluster import connect_ray as connect

    connect(max(num_workers, os.cpu_count() or 1), temp_dir=temp_dir, dashboard=True,
            object_store_memory=local_object_store_bytes())


def _cluster_may_grow() -> bool:
    """Whether the connected Ray may gain nodes: not the local one `connect_ray` started, and not one whose
    GCS is on a loopback address (``infra.local``'s head; a job submitted to it)."""
    import ray

    from infra.raycluster import is_loopback, started_here

    return not started_here() and not is_loopback(ray.get_runtime_context().gcs_address)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check_gpus(config: TrainConfig) -> None:
    """A GPU run (``scaling.use_gpu``) on a Ray with fewer GPUs than it needs would wait for them forever:
    a `ConfigError` on a Ray of this machine alone, a warning on a cluster that may grow (an autoscaler may
    add GPU nodes while Ray Train waits: `_cluster_may_grow`)."""
    import ray

    from trainer.config import ConfigError

    s, d = config.scaling, config.distill
    if not s.use_gpu:
        return
    workers = _num_workers(config)
    workers = workers[0] if isinstance(workers, tuple) else workers  # an elastic run starts at its minimum
    # worker r asks actor r % remote_actors: no more actors than workers are ever placed
    actors = min(d.remote_actors, workers) if d.kind != "none" and d.source == "remote" else 0
    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= workers + actors:
        return
    need = _plural(workers, "worker") + (f" and {_plural(actors, 'teacher actor')}" if actors else "")
    message = f"scaling.use_gpu=true needs {_plural(workers + actors, 'GPU')} ({need}); the Ray cluster has {have}"
    if not _cluster_may_grow():
        raise ConfigError([f"{message}: pass scaling.use_gpu=false to train on this machine's CPUs (slowly), "
                           f"or run where the GPUs are"])
    log.warning("%s: Ray Train waits until the cluster has them (an autoscaler may add GPU nodes)", message)


def local_object_store_bytes() -> int:
    """The embedded Ray's object store: 256 MiB on a machine without a GPU (tests, laptops, the demo), and
    4 GiB with one: a remote teacher's batches (bf16 views, ~38 MB a step per worker at DeiT's size, two
    steps in flight) would spill to disk in 256 MiB. ``DISTILLERY_RAY_OBJECT_STORE_MB`` sets it."""
    if os.environ.get("DISTILLERY_RAY_OBJECT_STORE_MB"):
        return int(os.environ["DISTILLERY_RAY_OBJECT_STORE_MB"]) * 1024 * 1024
    import torch

    return (4096 if torch.cuda.is_available() else 256) * 1024 * 1024


def local_tracking_warning(tracking_uri: str, run_dir: str) -> str | None:
    """What to say when MLflow would write a SQLite file on the rank-0 node while the run itself lives on
    object storage or on a cluster: the driver and the other nodes would never see those metrics."""
    remote = "://" in run_dir and not run_dir.startswith("file://")
    cluster = bool(os.environ.get("DISTILLERY_RAY_GCS_ADDRESS") or os.environ.get("RAY_ADDRESS"))
    if not tracking_uri.startswith("sqlite:") or not (remote or cluster):
        return None
    where = f"checkpoints on {run_dir}" if remote else "a Ray cluster"
    return (f"MLflow tracking goes to {tracking_uri}, a file on whichever node runs rank 0; with {where}, set "
            f"MLFLOW_TRACKING_URI (or tracking.tracking_uri) to a tracking server that every node reaches")


def _job_id() -> str:
    submission = os.environ.get("RAY_JOB_SUBMISSION_ID", "")
    if submission:
        return submission
    try:
        import ray

        return ray.get_runtime_context().get_job_id() or ""
    except Exception:
        return ""


def code_version() -> str:
    """``DISTILLERY_CODE_VERSION``, else the checkout's commit read from ``.git`` (no git process), else the
    package version."""
    if os.environ.get("DISTILLERY_CODE_VERSION"):
        return os.environ["DISTILLERY_CODE_VERSION"]
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(" ", 1)[1]
        common = git / "commondir"
        root = (git / common.read_text().strip()).resolve() if common.is_file() else git
        for base in (git, root):
            if (base / ref).is_file():
                return f"{ref.rsplit('/', 1)[-1]}@{(base / ref).read_text().strip()[:12]}"
        packed = root / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if re.match(r"^[0-9a-f]{40} ", line) and line.endswith(" " + ref):
                    return f"{ref.rsplit('/', 1)[-1]}@{line[:12]}"
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"distillery {version('distillery')}"
    except PackageNotFoundError:
        return "unknown"

