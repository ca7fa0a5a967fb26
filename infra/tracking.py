"""A local MLflow tracking server process (SQLite metadata, local artifact store).

Why a server and not a ``file:`` / ``sqlite:`` URI: the trainer runs under Ray, where
workers log through the REST API exactly as they would against a shared team server, and
artifacts go through the server's artifact proxy (``mlflow-artifacts:/``), so nothing
depends on the worker's filesystem being the driver's.

The server binds to 127.0.0.1 only and keeps MLflow's host-header and CORS checks on,
restricted to this server's own loopback origins.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.procs import (
    LOOPBACK,
    ServiceRecord,
    ensure_port_free,
    find_free_port,
    start_detached,
    stop_pid,
    wait_for_http,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "mlflow"
DEFAULT_PORT = 5000


@dataclass(frozen=True)
class TrackingServer:
    """A running MLflow tracking server."""

    tracking_uri: str
    pid: int
    port: int
    log_path: str
    backend_store_uri: str
    artifacts_destination: str

    def env(self) -> dict[str, str]:
        """Environment that makes ``mlflow`` clients log to this server."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}

    def to_record(self) -> ServiceRecord:
        """The state-file entry for this server."""
        return ServiceRecord.for_process(
            SERVICE_NAME,
            self.pid,
            self.port,
            self.tracking_uri,
            self.log_path,
            extra={
                "backend_store_uri": self.backend_store_uri,
                "artifacts_destination": self.artifacts_destination,
            },
        )

    @classmethod
    def from_record(cls, record: ServiceRecord) -> TrackingServer:
        """Rebuild from a state-file entry."""
        return cls(
            record.url,
            record.pid,
            record.port,
            record.log_path,
            str(record.extra.get("backend_store_uri", "")),
            str(record.extra.get("artifacts_destination", "")),
        )


def mlflow_server_argv(port: int, backend_store_uri: str, artifacts_destination: str) -> list[str]:
    """Command line for ``mlflow server`` on loopback with one worker (MLflow 3.x flags).

    ``--serve-artifacts`` is MLflow 3's default but is passed explicitly so runs get
    ``mlflow-artifacts:/`` roots. ``--allowed-hosts``/``--cors-allowed-origins`` narrow MLflow's
    DNS-rebinding and CORS protection to this server's own loopback address.
    """
    hosts = f"{LOOPBACK}:{port},localhost:{port}"
    origins = f"http://{LOOPBACK}:{port},http://localhost:{port}"
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--allowed-hosts",
        hosts,
        "--cors-allowed-origins",
        origins,
    ]


def start_tracking_server(
    state_dir: str | os.PathLike[str],
    port: int | None = None,
    timeout: float = 90.0,
    enable_jobs: bool = False,
) -> TrackingServer:
    """Start ``mlflow server`` with its SQLite DB and artifacts under ``state_dir``.

    Waits until ``GET /health`` answers ``OK``. ``port=None`` picks a free port; an explicit
    port that is taken raises :class:`infra.procs.PortInUseError` naming ``--mlflow-port``.
    ``enable_jobs=False`` sets ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: MLflow 3's server
    otherwise starts a job runner with seven Huey consumer processes (used by GenAI
    features), which costs CPU and memory that training needs.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = find_free_port()
    else:
        ensure_port_free(port, "MLflow server", "--mlflow-port")
    backend = f"sqlite:///{state / 'mlflow.db'}"
    artifacts = str(state / "mlartifacts")
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if enable_jobs else "false"}
    proc, log_path = start_detached(
        SERVICE_NAME,
        mlflow_server_argv(port, backend, artifacts),
        state,
        env=env,
        cwd=state,
        # The server must not inherit a client-side tracking URI pointing elsewhere.
        unset_env=("MLFLOW_TRACKING_URI",),
    )
    server = TrackingServer(f"http://{LOOPBACK}:{port}", proc.pid, port, str(log_path), backend, artifacts)
    try:
        wait_for_http(
            f"{server.tracking_uri}/health",
            service="MLflow server",
            pid=proc.pid,
            log_path=log_path,
            timeout=timeout,
            accept=lambda status, body: status == 200 and body.strip() == b"OK",
        )
    except BaseException:
        stop_tracking_server(server)
        raise
    return server


def stop_tracking_server(server: TrackingServer, timeout: float = 15.0) -> None:
    """Stop the server and its uvicorn worker(s); confirm they are gone."""
    stop_pid(server.pid, name="MLflow server", timeout=timeout)
