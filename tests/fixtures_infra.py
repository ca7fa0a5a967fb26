"""Pytest fixtures that run the local stack's real servers (loaded via ``pytest_plugins``).

``tests/conftest.py`` loads this module with ``pytest_plugins = ["tests.fixtures_infra"]``.
The fixtures use the same code as ``python -m infra.local`` (``infra.objectstore``,
``infra.tracking``, ``infra.raycluster``), on free ports and in pytest's temp dirs, and on
teardown check that every process they started is gone.

* ``object_store`` (session): moto S3 server with bucket ``distillery``.
* ``s3_url`` (function): a fresh, unique ``s3://distillery/<test-name>-<uuid>`` prefix.
* ``s3_env`` (function): ``object_store.env()`` set in ``os.environ`` for one test.
* ``mlflow_server`` (session): MLflow tracking server (SQLite + local artifacts).
* ``ray_head`` (session): a loopback-only Ray head with the job server.
* ``local_ray`` (module): the in-process local Ray that ``trainer.run`` starts without RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from infra.objectstore import ObjectStore, start_object_store, stop_object_store
from infra.procs import descendants, pid_alive, process_cmdline, process_family
from infra.raycluster import RayHead, head_processes, start_ray_head, stop_ray_head
from infra.tracking import TrackingServer, start_tracking_server, stop_tracking_server

BUCKET = "distillery"


def _assert_gone(pids: list[int], what: str) -> None:
    alive = [pid for pid in pids if pid_alive(pid)]
    assert not alive, f"{what}: processes {alive} still running after stop"


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """A moto S3 server on a free 127.0.0.1 port with bucket ``distillery``; stopped at the end."""
    store = start_object_store(tmp_path_factory.mktemp("s3"), port=None, buckets=(BUCKET,))
    family = process_family(store.pid)
    try:
        yield store
    finally:
        stop_object_store(store)
        _assert_gone([store.pid, *family], "S3 server")


def _safe_name(name: str) -> str:
    """A test node name reduced to characters that are safe in an S3 key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80] or "test"


@pytest.fixture
def s3_url(object_store: ObjectStore, request: pytest.FixtureRequest) -> str:
    """``s3://distillery/<test-name>-<uuid>``: a prefix no other test (or rerun) shares."""
    return f"s3://{BUCKET}/{_safe_name(request.node.name)}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_env(object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3/s3fs in this process at the object store through the environment."""
    env = object_store.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """An MLflow tracking server on a free port (SQLite DB + artifacts in a temp dir)."""
    server = start_tracking_server(tmp_path_factory.mktemp("mlflow"), port=None)
    family = process_family(server.pid)
    try:
        yield server
    finally:
        stop_tracking_server(server)
        _assert_gone([server.pid, *family], "MLflow server")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head (GCS, raylet, dashboard/job server) on free loopback ports, 2 CPUs.

    The head uses token auth. In the test process submit with
    ``JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers())``; give a
    subprocess (``ray job submit``, a driver calling ``ray.init``) ``{**os.environ, **ray_head.env()}``.
    """
    head = start_ray_head(
        tmp_path_factory.mktemp("ray"),
        dashboard_port=None,
        gcs_port=None,
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
    )
    try:
        yield head
    finally:
        family = head_processes(head)
        stop_ray_head(head)
        _assert_gone([head.pid, *family], "Ray head")
        assert not head_processes(head), "Ray head: processes naming its temp dir survived"


def _rays_processes(temp_dir: str) -> list[int]:
    """This process's descendants that belong to its local Ray: GCS, raylet, dashboard (their arguments
    name ``temp_dir``) and the workers and actors (``ray::...``, their title once started)."""
    def rays(argv: list[str]) -> bool:
        return bool(argv) and (argv[0].startswith("ray::") or any(temp_dir in arg for arg in argv))

    return [pid for pid in descendants(os.getpid()) if rays(process_cmdline(pid))]


def _stop_survivors(pids: list[int], what: str, grace: float = 10.0) -> None:
    """Give ``pids`` ``grace`` seconds to exit, then SIGKILL the rest and warn: a Ray worker that outlives
    its raylet (once, a Ray Train controller, re-parented to init) would take CPU from every later test."""
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids if pid_alive(p)]
    if not survivors:
        return
    names = {p: " ".join(process_cmdline(p))[:60] for p in survivors}
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    warnings.warn(f"{what}: {names} outlived its shutdown by {grace:.0f} s; killed", stacklevel=2)


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """A local Ray on 127.0.0.1 (what ``run`` starts without RAY_ADDRESS), per test module, shut down at its
    end (the trainer's and the trainer bench's tests)."""
    import ray

    from trainer.run import connect_ray

    if ray.is_initialized():  # left by an earlier module: never skip the Ray tests because of it
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    # Ray Train's controller polls the workers every 2 s (reports, failures); faster here. The driver's value
    # is propagated to the controller (ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE).
    saved = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    connect_ray(2, temp_dir=temp)
    try:
        yield ray
    finally:
        started = _rays_processes(temp)  # before the shutdown, while the workers are still the raylet's
        ray.shutdown()
        _stop_survivors(started, "the local Ray")
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
        else:
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = saved
