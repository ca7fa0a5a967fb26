"""MLflow tracking from rank 0, asynchronous: a slow or dead server never holds up a training step.

Every call of :class:`Tracker` (``log_metrics``, ``log_model``) puts a message on a bounded queue and
returns; one background thread talks to MLflow. If the server cannot be reached (down at the start, or
stopped in the middle of a run), the thread warns, holds what is logged and tries again with backoff;
when the server returns the held metrics are sent with their original steps and times. ``close`` makes
one last try and waits a bounded time; what still could not be sent is reported, never raised.

One MLflow run per training, continued across restarts: the run id is written to ``tracking.json`` in the
run's storage folder (and kept in each checkpoint's metadata). A restarted worker group, or ``run()``
called again with the same name and storage, finds it there and logs into the same run (status back to
RUNNING, tag ``distillery.resumed_at_step``) instead of creating another one; steps trained again after a
restart are logged again for the same step numbers.

What is logged: params = the flattened resolved config (``checkpoint.safe_config``: no credentials);
tags = code version, Ray job id, dataset fingerprint, teacher identity (whatever the caller passes);
the config as ``config.json``; metrics with their step; MLflow's system metrics (``system/...``, every
``system_metrics_every_s``); at the end the training-curve and throughput plots (`PLOTS`, from the run's
whole history on the server), the final model with ``mlflow.pytorch.log_model`` and the final checkpoint's
files (``checkpoint/``: what ``model.pretrained_path`` and ``resume=`` load, downloaded from the run's
storage when that is object storage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import deque
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
    system_metrics_every_s: float = 0.0  # MLflow's system metrics monitor; 0: off
    plots: bool = True  # training-curve and throughput plots as artifacts at the end


# the plots made at the end from the run's whole metric history (every attempt of a resumed run)
PLOTS = {
    "plots/training.png": (("loss", "loss_base", "loss_distill"), ("lr",), ("eval/top1", "eval/fused_top1")),
    "plots/throughput.png": (("img_per_s",), ("data_wait_frac",), ()),
}


class NullTracker:
    """The tracker of ranks other than 0, and of runs without tracking: does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_model(self, model: Any) -> None:
        pass

    def log_checkpoint(self, path: str) -> None:
        pass

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        return True


class Tracker(NullTracker):
    """Rank 0's MLflow logger; all MLflow calls happen on one background (daemon) thread.

    While the server cannot be reached, what is logged is held (metrics up to ``max_held`` values, oldest
    dropped and counted beyond that; the final model) and sent again every ``retry_s`` .. ``retry_max_s``
    seconds, so an outage in the middle of a run loses nothing: metrics arrive when the server returns, or
    at ``close`` (one last try). One warning per outage, one line when it ends.
    """

    def __init__(self, spec: TrackingSpec, request_timeout: float = 10.0, max_retries: int = 2,
                 retry_s: float = 2.0, retry_max_s: float = 60.0, max_held: int = 1_000_000) -> None:
        self.spec = spec
        self.run_id = None
        self.failed = False  # something could not be delivered (at close: was lost)
        self.dropped = 0  # metric values dropped: queue full or held beyond max_held
        self.outages = 0
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(_MAX_QUEUE)
        self._retry_s, self._retry_max_s, self._max_held = retry_s, retry_max_s, max_held
        self._held: deque[Any] = deque()  # Metric entities not yet sent, oldest first
        self._model: Any = None  # the final model, until sent
        self._checkpoint: str | None = None  # the final checkpoint's folder or URL, until sent
        self._client: Any = None
        self._created: str | None = None  # the run this tracker created (its params go once)
        self._params_sent = False
        self._down_since: float | None = None
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor, once the run exists
        self._next_try = 0.0
        self._delay = retry_s
        # Bounded HTTP behaviour for this process's MLflow client (MLflow's defaults: 7 retries, 120 s).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(request_timeout)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training side: never blocks

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += len(item[1][0]) if item[0] == "metrics" else 1
            if self.dropped == 1:
                log.warning("MLflow is not keeping up: the tracking queue is full, dropping metrics")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` (name -> number) for ``step``; returns at once."""
        stamp = int(time.time() * 1000)
        self._put(("metrics", (dict(metrics), step, stamp)))

    def log_model(self, model: Any) -> None:
        """Queue the final model (a CPU copy is taken by the caller) for ``mlflow.pytorch.log_model``."""
        self._put(("model", model))

    def log_checkpoint(self, path: str) -> None:
        """Queue the final checkpoint (a folder or URL: ``checkpoint.resolve_checkpoint``'s answer) for the
        run's artifacts, under ``checkpoint/``, sent at ``close`` after the run has ended (give ``close``
        the time a checkpoint's upload takes)."""
        self._put(("checkpoint", path))

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Send what is held (one last try), mark the run ``status``; wait at most ``timeout`` s.
        True if everything logged reached the server."""
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
        from mlflow.entities import Metric

        while True:
            wait = None if self._settled() else max(0.0, self._next_try - time.monotonic())
            try:
                kind, payload = self._queue.get(timeout=wait)
            except queue.Empty:
                kind, payload = "retry", None
            while kind == "metrics":  # take what is waiting too: one request for many steps
                values, step, stamp = payload
                self._hold([Metric(k, float(v), stamp, step) for k, v in values.items()])
                try:
                    kind, payload = self._queue.get_nowait()
                except queue.Empty:
                    kind, payload = "retry", None
            if kind == "model":
                self._model = payload
            if kind == "checkpoint":
                self._checkpoint = payload
            if kind == "end":
                self._flush(force=True)
                if self._monitor is not None:
                    self._attempt(self._monitor.finish, "stop the system metrics")
                if self.run_id is not None and self._settled() and self.spec.plots:
                    self._attempt(self._send_plots, "log the plots")
                if self.run_id is not None and self._settled():
                    self._attempt(lambda s=payload: self._client.set_terminated(self.run_id, status=s),
                                  "end the run")
                lost = len(self._held) + (self._model is not None)
                if lost:
                    log.warning("MLflow at %s unreachable at the end of training: %d metric values%s not "
                                "logged", self.spec.tracking_uri, len(self._held),
                                " and the model" if self._model is not None else "")
                if self._checkpoint is not None:  # last, once: the largest upload, and the run is complete without
                    lost += not self._send_final_checkpoint(self._checkpoint)
                self.failed = self.failed or bool(lost) or self.run_id is None
                return
            self._flush()

    def _settled(self) -> bool:
        """Nothing waits to be sent (the run exists, no metrics or model held; the final checkpoint goes at
        the end, once)."""
        return self.run_id is not None and not self._held and self._model is None

    def _hold(self, metrics: list[Any]) -> None:
        self._held.extend(metrics)
        over = len(self._held) - self._max_held
        if over > 0:
            for _ in range(over):
                self._held.popleft()
            if self.dropped == 0:
                log.warning("MLflow has been unreachable too long: dropping the oldest held metrics")
            self.dropped += over

    def _flush(self, force: bool = False) -> None:
        """Send what is held, in order: the run, metrics, the model. Stops at the first failure."""
        if self._settled() or (not force and time.monotonic() < self._next_try):
            return
        if self.run_id is None and not self._attempt(self._start, "start the run"):
            return
        while self._held:
            batch = [self._held[i] for i in range(min(_BATCH, len(self._held)))]
            if not self._attempt(lambda b=batch: self._client.log_batch(self.run_id, metrics=b), "log metrics"):
                return
            for _ in batch:
                self._held.popleft()
        if self._model is not None and self._attempt(lambda m=self._model: self._send_model(m), "log the model"):
            self._model = None

    def _attempt(self, fn: Any, what: str) -> bool:
        """Run one MLflow call; a failure starts (or continues) an outage and schedules the next try."""
        try:
            fn()
        except Exception as exc:  # any failure of the tracking server must not reach training
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                self.outages += 1
                log.warning("MLflow at %s: could not %s (%s: %s); holding metrics and trying again, training "
                            "goes on", self.spec.tracking_uri, what, type(exc).__name__, str(exc)[:300])
            self._next_try = now + self._delay
            self._delay = min(self._delay * 2, self._retry_max_s)
            return False
        if self._down_since is not None:
            log.warning("MLflow at %s is back after %.0f s; sending %d held metric values",
                        self.spec.tracking_uri, time.monotonic() - self._down_since, len(self._held))
            self._down_since = None
        self._delay = self._retry_s
        return True

    def _start(self) -> None:
        """Find the run to continue or create it, then log the params (once per created run)."""
        from mlflow import MlflowClient
        from mlflow.entities import Param

        spec = self.spec
        client = MlflowClient(tracking_uri=spec.tracking_uri)
        run_id = self._created or self._existing_run_id(client)
        if run_id is None:
            experiment = client.get_experiment_by_name(spec.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = None
                if spec.tracking_uri.startswith("sqlite:") and spec.run_dir and "://" not in spec.run_dir:
                    artifacts = "file://" + os.path.abspath(os.path.join(spec.run_dir, "mlartifacts"))
                experiment_id = client.create_experiment(spec.experiment, artifact_location=artifacts)
            run_id = self._created = client.create_run(experiment_id, run_name=spec.run_name,
                                                       tags=dict(spec.tags)).info.run_id
            self._write_run_file({"run_id": run_id, "experiment_id": experiment_id,
                                  "tracking_uri": spec.tracking_uri})
            log.info("MLflow: run %s in experiment %r at %s", run_id, spec.experiment, spec.tracking_uri)
        elif not self._created:
            client.update_run(run_id, status="RUNNING")
            if spec.resumed_at_step is not None:
                client.set_tag(run_id, "distillery.resumed_at_step", str(spec.resumed_at_step))
            log.info("MLflow: continuing run %s", run_id)
        if self._created and not self._params_sent:
            items = [Param(k, v[:6000]) for k, v in spec.params.items()]
            for i in range(0, len(items), _PARAM_BATCH):
                client.log_batch(run_id, params=items[i:i + _PARAM_BATCH])
            client.log_text(run_id, json.dumps(spec.params, indent=1), "config.json")
            self._params_sent = True
        self._client, self.run_id = client, run_id
        if spec.system_metrics_every_s > 0 and self._monitor is None:
            self._start_monitor(run_id, resume=not self._created)

    def _start_monitor(self, run_id: str, resume: bool) -> None:
        """MLflow's system metrics (``system/...``) on their own thread; one that fails only warns. It
        stops by itself when the server is unreachable (the training metrics are held, these are not)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=self.spec.system_metrics_every_s,
                                           resume_logging=resume, tracking_uri=self.spec.tracking_uri)
            monitor.start()
            self._monitor = monitor
        except Exception as exc:  # psutil or NVML missing, or the server: never a reason to stop training
            log.warning("MLflow system metrics are off: %s: %s", type(exc).__name__, exc)

    def _send_plots(self) -> None:
        """`PLOTS` from the run's metric history on the server: each is (left-axis metrics, right-axis
        metrics, metrics on a second panel) against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def history(key: str) -> tuple[list[int], list[float]]:
            points = sorted((m.step, m.timestamp, m.value) for m in self._client.get_metric_history(self.run_id, key))
            latest = {step: value for step, _, value in points}  # steps trained again after a restart: the last
            return list(latest), list(latest.values())

        for path, (left, right, below) in PLOTS.items():
            fig, axes = plt.subplots(2 if below else 1, 1, figsize=(8, 6 if below else 3.5), squeeze=False)
            ax = axes[0][0]
            for key in left:
                ax.plot(*history(key), label=key)
            twin = ax.twinx() if right else None
            for key in right:
                twin.plot(*history(key), label=key, color="tab:gray", linestyle="--")
            ax.set_xlabel("step")
            ax.legend(loc="upper left", fontsize="small")
            if twin is not None:
                twin.legend(loc="upper right", fontsize="small")
            if below:
                for key in below:
                    axes[1][0].plot(*history(key), marker="o", label=key)
                axes[1][0].set_xlabel("step")
                axes[1][0].set_ylabel("top-1 (%)")
                axes[1][0].legend(fontsize="small")
            fig.suptitle(f"{self.spec.run_name}: {path.split('/')[-1].removesuffix('.png')}")
            fig.tight_layout()
            try:
                self._client.log_figure(self.run_id, fig, path)
            finally:
                plt.close(fig)

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

    def _send_final_checkpoint(self, path: str) -> bool:
        """The final checkpoint's files under ``checkpoint/`` (fetched to a local folder first when ``path``
        is a URL), after the run has ended (MLflow takes artifacts of a finished run): one try, since the
        run is complete without it and it stays in the run's storage either way. True if it was logged."""
        from trainer.checkpoint import local_copy

        if self.run_id is None:
            return False
        try:
            with contextlib.ExitStack() as stack:
                self._client.log_artifacts(self.run_id, str(local_copy(path, stack)), "checkpoint")
            return True
        except Exception as exc:  # noqa: BLE001 - the run and its checkpoint are intact; say so and go on
            log.warning("could not log the final checkpoint %s to MLflow at %s (%s: %s); it stays in the run's "
                        "storage", path, self.spec.tracking_uri, type(exc).__name__, str(exc)[:300])
            return False

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
