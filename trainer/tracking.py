"""MLflow tracking from rank 0, asynchronous: a slow or dead server never holds up a training step.

Every call of :class:`Tracker` (``log_metrics``, ``log_model``) puts a message on a bounded queue and
returns; one background thread talks to MLflow. If the server cannot be reached, the thread warns once and
drops what follows, and training goes on. ``close`` waits a bounded time for the queue to drain.

One MLflow run per training, continued across restarts: the run id is written to ``tracking.json`` in the
run's storage folder (and kept in each checkpoint's metadata). A restarted worker group, or ``run()``
called again with the same name and storage, finds it there and logs into the same run (status back to
RUNNING, tag ``distillery.resumed_at_step``) instead of creating another one; steps trained again after a
restart are logged again for the same step numbers.

What is logged: params = the flattened resolved config (``checkpoint.safe_config``: no credentials);
tags = code version, Ray job id, dataset fingerprint, teacher identity (whatever the caller passes);
the config as ``config.json``; metrics with their step; the final model with ``mlflow.pytorch.log_model``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Tracker", "NullTracker", "TrackingSpec", "RUN_FILE", "default_tracking_uri"]

RUN_FILE = "tracking.json"  # in the run's storage folder: {"run_id", "experiment_id", "tracking_uri"}
_MAX_QUEUE = 10_000
_BATCH = 1000  # MLflow's log_batch limit on metrics per request
_PARAM_BATCH = 100  # ... and on params


def default_tracking_uri(run_dir: str | None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``mlruns.db`` in the (local) run folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if run_dir and "://" not in run_dir:
        return f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'mlruns.db'))}"
    return f"sqlite:///{os.path.abspath('mlruns.db')}"


@dataclass
class TrackingSpec:
    """What the tracker needs to find or create its MLflow run."""

    tracking_uri: str
    experiment: str
    run_name: str
    run_dir: str | None = None  # storage folder of the training run: RUN_FILE lives there
    known_run_id: str | None = None  # from the checkpoint being resumed, if any
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    resumed_at_step: int | None = None


class NullTracker:
    """The tracker of ranks other than 0, and of runs without tracking: does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_model(self, model: Any) -> None:
        pass

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        return True


class Tracker(NullTracker):
    """Rank 0's MLflow logger; all MLflow calls happen on one background (daemon) thread."""

    def __init__(self, spec: TrackingSpec, request_timeout: float = 10.0, max_retries: int = 2) -> None:
        self.spec = spec
        self.run_id = None
        self.failed = False
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(_MAX_QUEUE)
        # Bounded HTTP behaviour for this process's MLflow client (MLflow's defaults: 7 retries, 120 s).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(request_timeout)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._put(("start", None))
        self._thread.start()

    # ------------------------------------------------------------------ the training side: never blocks

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("MLflow is not keeping up: the tracking queue is full, dropping metrics")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` (name -> number) for ``step``; returns at once."""
        stamp = int(time.time() * 1000)
        self._put(("metrics", (dict(metrics), step, stamp)))

    def log_model(self, model: Any) -> None:
        """Queue the final model (a CPU copy is taken by the caller) for ``mlflow.pytorch.log_model``."""
        self._put(("model", model))

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Mark the run ``status`` once the queue is drained; wait at most ``timeout`` s. True if all went."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):  # a full queue: the join below times out, the rest is dropped
            self._queue.put(("end", status), timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("MLflow tracking did not finish within %.0f s; the rest is dropped", timeout)
            return False
        return not self.failed

    # ------------------------------------------------------------------ the background thread

    def _loop(self) -> None:
        client = None
        held: tuple[str, Any] | None = None  # a message taken out while coalescing metrics
        while True:
            kind, payload = held if held is not None else self._queue.get()
            held = None
            if kind == "end":
                if client is not None and not self.failed:
                    self._safely(lambda c=client, s=payload: c.set_terminated(self.run_id, status=s), "end the run")
                return
            if self.failed:
                continue  # the server is gone: drop, keep draining so close() returns
            if kind == "start":
                client = self._safely(self._start, "start the run")
            elif kind == "metrics":
                batch = [payload]
                while len(batch) * 16 < _BATCH:  # coalesce what is waiting into one request
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[0] != "metrics":
                        held = nxt
                        break
                    batch.append(nxt[1])
                self._safely(lambda c=client, b=batch: self._send_metrics(c, b), "log metrics")
            elif kind == "model":
                self._safely(lambda m=payload: self._send_model(m), "log the model")

    def _safely(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except Exception as exc:  # any failure of the tracking server must not reach training
            self.failed = True
            log.warning("MLflow at %s: could not %s (%s: %s); tracking is off for the rest of this run, "
                        "training goes on", self.spec.tracking_uri, what, type(exc).__name__, str(exc)[:300])
            return None

    def _start(self) -> Any:
        from mlflow import MlflowClient

        spec = self.spec
        client = MlflowClient(tracking_uri=spec.tracking_uri)
        run_id = self._existing_run_id(client)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            if spec.resumed_at_step is not None:
                client.set_tag(run_id, "distillery.resumed_at_step", str(spec.resumed_at_step))
            log.info("MLflow: continuing run %s", run_id)
            self.run_id = run_id
            return client
        experiment = client.get_experiment_by_name(spec.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if spec.tracking_uri.startswith("sqlite:") and spec.run_dir and "://" not in spec.run_dir:
                artifacts = "file://" + os.path.abspath(os.path.join(spec.run_dir, "mlartifacts"))
            experiment_id = client.create_experiment(spec.experiment, artifact_location=artifacts)
        run = client.create_run(experiment_id, run_name=spec.run_name, tags=dict(spec.tags))
        self.run_id = run.info.run_id
        self._write_run_file({"run_id": self.run_id, "experiment_id": experiment_id,
                              "tracking_uri": spec.tracking_uri})
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in spec.params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            client.log_batch(self.run_id, params=items[i:i + _PARAM_BATCH])
        client.log_text(self.run_id, json.dumps(spec.params, indent=1), "config.json")
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, spec.experiment, spec.tracking_uri)
        return client

    def _existing_run_id(self, client: Any) -> str | None:
        """The run to continue: the one named in the run folder's RUN_FILE, else the checkpoint's."""
        candidates = []
        recorded = self._read_run_file()
        if recorded and recorded.get("tracking_uri") == self.spec.tracking_uri:
            candidates.append(recorded.get("run_id"))
        candidates.append(self.spec.known_run_id)
        for run_id in candidates:
            if not run_id:
                continue
            try:
                client.get_run(run_id)
                return run_id
            except Exception:
                log.warning("MLflow run %s (from an earlier attempt) is not on %s; starting a new run",
                            run_id, self.spec.tracking_uri)
        return None

    def _read_run_file(self) -> dict[str, Any] | None:
        if not self.spec.run_dir:
            return None
        from pipeline.storage import Location, exists, read_json

        fs, path = Location(self.spec.run_dir).fs_and_path()
        target = f"{path}/{RUN_FILE}"
        return read_json(fs, target) if exists(fs, target) else None

    def _write_run_file(self, value: dict[str, Any]) -> None:
        if not self.spec.run_dir:
            return
        from pipeline.storage import Location, write_json

        fs, path = Location(self.spec.run_dir).fs_and_path()
        write_json(fs, f"{path}/{RUN_FILE}", value)

    def _send_metrics(self, client: Any, batch: list[tuple[dict[str, float], int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), stamp, step) for values, step, stamp in batch for k, v in values.items()]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(self.run_id, metrics=metrics[i:i + _BATCH])

    def _send_model(self, model: Any) -> None:
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.spec.tracking_uri)
        # Pinned requirements: skips MLflow's slow requirement inference (it imports and profiles the model).
        import timm
        import torch

        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]
        with mlflow.start_run(run_id=self.run_id):
            # pickle: the "pt2" default needs an input example and a torch.export trace
            mlflow.pytorch.log_model(model, name="model", pip_requirements=requirements,
                                     serialization_format="pickle")
