"""The local stack with real processes (moto S3 server, MLflow server, Ray head); no mocks.

Every test checks that what it started is gone afterwards (pids not alive), and the
fixtures in tests/fixtures_infra.py do the same on teardown.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest

from infra.objectstore import ObjectStore, start_object_store, stop_object_store
from infra.procs import (
    PortInUseError,
    ServiceRecord,
    ensure_port_free,
    find_free_port,
    http_get,
    is_port_free,
    pid_alive,
    process_family,
    read_state,
    start_detached,
    stop_pid,
    write_state,
)
from infra.raycluster import RayHead, head_processes, ray_temp_dir
from infra.tracking import TrackingServer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "infra.local"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m infra.local ARGS`` from the repository root."""
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- procs


def test_port_taken_error_names_port_service_and_flag() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not is_port_free(port)
        with pytest.raises(PortInUseError) as err:
            ensure_port_free(port, "S3 server", "--s3-port")
    assert str(err.value) == f"port {port} for the S3 server is taken: stop what holds it or pass --s3-port"
    assert is_port_free(port)


def test_state_file_round_trip_is_atomic(tmp_path: Path) -> None:
    records = [ServiceRecord("s3", 123, 9000, "http://127.0.0.1:9000", "/x/s3.log", {"a": 1}, 4567)]
    path = write_state(tmp_path, records)
    assert read_state(tmp_path) == records
    assert json.loads(path.read_text())["services"][0]["pid"] == 123
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "no temp file left behind"
    assert read_state(tmp_path / "missing") == []


def test_stop_pid_stops_the_whole_process_tree(tmp_path: Path) -> None:
    # A shell that forks a child which ignores SIGTERM: stop_pid must escalate and get both.
    script = "trap '' TERM; sleep 300 & wait"
    proc, _ = start_detached("tree", ["/bin/sh", "-c", script], tmp_path)
    deadline = time.monotonic() + 10
    while len(process_family(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = process_family(proc.pid)
    assert proc.pid in family and len(family) >= 2
    stopped = stop_pid(proc.pid, name="test tree", timeout=1.0)
    assert set(family) <= set(stopped)
    assert not any(pid_alive(pid) for pid in family)


# --------------------------------------------------------------------------- (a) object store


@pytest.mark.s3
def test_object_store_put_get_through_s3fs_and_boto3(object_store: ObjectStore, s3_url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **object_store.storage_options())
    fs.pipe(f"{s3_url}/a/hello.txt", b"hello s3fs")
    assert fs.cat(f"{s3_url}/a/hello.txt") == b"hello s3fs"
    assert fs.ls(f"{s3_url}/a", detail=False) == [f"{s3_url}/a/hello.txt".removeprefix("s3://")]

    client = object_store.boto3_client()
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client.put_object(Bucket=bucket, Key=f"{prefix}/b.bin", Body=b"\x00\x01boto3")
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/b.bin")["Body"].read() == b"\x00\x01boto3"
    # What boto3 wrote, s3fs reads, and the other way round.
    fs.invalidate_cache()
    assert fs.cat(f"{s3_url}/b.bin") == b"\x00\x01boto3"
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/a/hello.txt")["Body"].read() == b"hello s3fs"


@pytest.mark.s3
def test_s3_url_is_a_fresh_prefix(object_store: ObjectStore, s3_url: str, request: pytest.FixtureRequest) -> None:
    assert s3_url.startswith(f"s3://distillery/{request.node.name}-")
    import fsspec

    fs = fsspec.filesystem("s3", **object_store.storage_options())
    assert not fs.exists(s3_url)


@pytest.mark.s3
def test_object_store_stop_leaves_no_process(tmp_path: Path) -> None:
    store = start_object_store(tmp_path, port=None, buckets=("one", "two"))
    names = {b["Name"] for b in store.boto3_client().list_buckets()["Buckets"]}
    assert names == {"one", "two"}
    assert store.env()["AWS_ENDPOINT_URL"] == store.endpoint_url == f"http://127.0.0.1:{store.port}"
    family = process_family(store.pid)
    stop_object_store(store)
    assert not any(pid_alive(pid) for pid in [store.pid, *family])
    assert is_port_free(store.port)


# --------------------------------------------------------------------------- (b) MLflow


def test_mlflow_server_logs_and_reads_back(mlflow_server: TrackingServer, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert mlflow_server.env() == {"MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"infra-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    for step, value in enumerate([0.9, 0.5, 0.25]):
        client.log_metric(run.info.run_id, "loss", value, step=step)
    client.log_text(run.info.run_id, "artifact through the server's proxy", "notes/readme.txt")
    client.set_terminated(run.info.run_id)

    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    local = client.download_artifacts(run.info.run_id, "notes/readme.txt", str(tmp_path))
    assert Path(local).read_text() == "artifact through the server's proxy"
    # Artifacts went through the server into its own artifacts destination.
    assert list(Path(mlflow_server.artifacts_destination).rglob("readme.txt"))


# --------------------------------------------------------------------------- (c) the CLI


def test_cli_up_refuses_second_up_status_and_down_leave_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    s3_port, mlflow_port = find_free_port(), find_free_port()
    common = ["--state-dir", str(state_dir)]
    up = run_cli("up", *common, "--only", "s3,mlflow", "--s3-port", str(s3_port), "--mlflow-port", str(mlflow_port))
    try:
        assert up.returncode == 0, up.stderr
        records = {r.name: r for r in read_state(state_dir)}
        assert set(records) == {"s3", "mlflow"}
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{s3_port}" in up.stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in up.stdout
        assert "TEST keys" in up.stdout  # moto's fixed keys are labelled as such
        families = {name: process_family(r.pid) for name, r in records.items()}
        assert all(pid_alive(r.pid) for r in records.values())

        again = run_cli("up", *common, "--only", "s3", "--s3-port", "0")
        assert again.returncode != 0
        assert "already running" in again.stderr and "infra.local down" in again.stderr
        assert {r.name: r.pid for r in read_state(state_dir)} == {n: r.pid for n, r in records.items()}

        status = run_cli("status", *common)
        assert status.returncode == 0, status.stdout + status.stderr
        lines = status.stdout.splitlines()
        assert any(line.startswith("s3") and "running" in line for line in lines)
        assert any(line.startswith("mlflow") and "running" in line for line in lines)
    finally:
        down = run_cli("down", *common)
    assert down.returncode == 0, down.stderr
    assert not (state_dir / "state.json").exists()
    leftovers = [pid for pids in families.values() for pid in pids if pid_alive(pid)]
    assert not leftovers, f"processes left behind: {leftovers}"
    assert is_port_free(s3_port) and is_port_free(mlflow_port)

    after = run_cli("status", *common)
    assert after.returncode != 0 and "not running" in after.stdout


def test_cli_port_taken_names_port_and_flag_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli(
            "up", "--state-dir", str(tmp_path), "--only", "s3,mlflow", "--s3-port", str(port), "--mlflow-port", "0"
        )
    assert result.returncode == 1
    assert f"port {port} for the S3 server is taken: stop what holds it or pass --s3-port" in result.stderr
    assert "starting" not in result.stderr
    assert read_state(tmp_path) == []


def test_cli_never_stops_a_recorded_pid_that_now_belongs_to_another_process(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        real = ServiceRecord.for_process("s3", other.pid, 1, "http://127.0.0.1:1", "/dev/null")
        assert real.is_current() and real.start_ticks > 0
        # As if the machine rebooted and the recorded pid was handed to an unrelated process.
        write_state(tmp_path, [ServiceRecord("s3", other.pid, 1, "http://127.0.0.1:1", "/dev/null", {}, 1)])
        status = run_cli("status", "--state-dir", str(tmp_path))
        assert status.returncode == 1 and "not running" in status.stdout
        down = run_cli("down", "--state-dir", str(tmp_path))
        assert down.returncode == 0, down.stderr
        assert other.poll() is None, "down must not signal a process it did not start"
        assert read_state(tmp_path) == []
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------- (d) Ray


def test_ray_temp_dir_stays_short_enough_for_unix_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / "state"
    first, second = ray_temp_dir(deep), ray_temp_dir(deep)
    assert first == second and len(str(first)) <= 40
    assert ray_temp_dir(tmp_path / "other" / ("d" * 60)) != first
    assert ray_temp_dir("/s") == Path("/s/ray")


@pytest.mark.slow
def test_ray_head_via_cli_runs_a_job_and_down_leaves_no_ray_process(tmp_path: Path) -> None:
    state_dir = tmp_path / "r"
    short = ray_temp_dir(state_dir)
    assert short.name.startswith("distillery-ray-"), "this test covers the short temp dir"
    dashboard_port, gcs_port, s3_port, mlflow_port = (find_free_port() for _ in range(4))
    common = ["--state-dir", str(state_dir)]
    up = run_cli(
        "up",
        *common,
        "--s3-port",
        str(s3_port),
        "--mlflow-port",
        str(mlflow_port),
        "--ray-dashboard-port",
        str(dashboard_port),
        "--ray-port",
        str(gcs_port),
        "--ray-num-cpus",
        "1",
        "--ray-object-store-mb",
        "100",
    )
    head: RayHead | None = None
    family: set[int] = set()
    try:
        assert up.returncode == 0, up.stderr
        head = RayHead.from_record(next(r for r in read_state(state_dir) if r.name == "ray"))
        family.update(head_processes(head))
        assert f"export RAY_ADDRESS=http://127.0.0.1:{dashboard_port}" in up.stdout
        assert f"export DISTILLERY_RAY_GCS_ADDRESS=127.0.0.1:{gcs_port}" in up.stdout
        assert "export RAY_AUTH_MODE=token" in up.stdout

        env = {**os.environ, **head.env()}
        submission_id = f"infra-test-{uuid.uuid4().hex[:8]}"
        job = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "job",
                "submit",
                "--address",
                head.dashboard_url,
                "--submission-id",
                submission_id,
                "--",
                "python",
                "-c",
                # jobs do not get the submitter's environment: what the head was started with
                # and the state API (Ray Train's placement-group cleaner) asks this head, not any Ray it finds
                "import os; print('hello from ray', os.environ.get('AWS_ENDPOINT_URL'), "
                "os.environ.get('MLFLOW_TRACKING_URI'), os.environ.get('RAY_API_SERVER_ADDRESS'))",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode == 0, job.stdout + job.stderr
        assert f"hello from ray http://127.0.0.1:{s3_port} http://127.0.0.1:{mlflow_port} " \
               f"http://127.0.0.1:{dashboard_port}" in job.stdout
        assert f"Job '{submission_id}' succeeded" in job.stdout + job.stderr

        # The job server wants this head's token: without it 401, with it the job's record.
        job_url = f"{head.dashboard_url}/api/jobs/{submission_id}"
        assert http_get(job_url)[0] == 401
        status, body = http_get(job_url, headers=head.auth_headers())
        assert status == 200 and json.loads(body)["status"] == "SUCCEEDED"
        token = head.auth_headers()["Authorization"].removeprefix("Bearer ")
        assert len(token) == 64 and token not in up.stdout + up.stderr
        assert Path(head.auth_token_path).stat().st_mode & 0o777 == 0o600
        family.update(head_processes(head))
        assert head.pid in family and len(family) > 3
    finally:
        down = run_cli("down", *common)
    assert down.returncode == 0, down.stderr
    assert head is not None
    leftovers = [pid for pid in family if pid_alive(pid)]
    assert not leftovers, f"Ray processes left behind: {leftovers}"
    assert head_processes(head) == []
    assert all(is_port_free(port) for port in (dashboard_port, gcs_port, s3_port, mlflow_port))
    assert head.temp_dir == str(short) and not short.exists(), "the short temp dir is scratch"
    assert (state_dir / "ray.log").exists()


def test_only_a_cluster_on_other_hosts_keeps_rays_own_node_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster on other hosts is left to Ray's settings; a head on this machine, like the embedded Ray,
    gets loopback. And a job-server URL is not an address ray.init takes."""
    import ray
    from ray._private import ray_constants

    from infra import raycluster

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    with mock.patch.dict(os.environ):  # connect_ray's setdefaults stay in here
        for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
            os.environ.pop(name, None)
        os.environ["DISTILLERY_RAY_GCS_ADDRESS"] = "10.1.2.3:6379"
        raycluster.connect_ray()
        assert calls == [{"address": "10.1.2.3:6379"}] and ray_constants.ENABLE_RAY_CLUSTER is True
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
        del os.environ["DISTILLERY_RAY_GCS_ADDRESS"]
        os.environ["RAY_JOB_ID"] = "02000000"  # a submitted job's driver without an address: its cluster
        raycluster.connect_ray()
        assert calls[-1] == {"address": "auto"} and ray_constants.ENABLE_RAY_CLUSTER is True
        os.environ["DISTILLERY_RAY_GCS_ADDRESS"] = "127.0.0.1:6379"
        raycluster.connect_ray()
        assert calls[-1] == {"address": "127.0.0.1:6379"} and ray_constants.ENABLE_RAY_CLUSTER is False
        os.environ["DISTILLERY_RAY_GCS_ADDRESS"] = "http://127.0.0.1:8265"
        with pytest.raises(raycluster.RayAddressError, match=r"^DISTILLERY_RAY_GCS_ADDRESS=http://127\.0\.0\.1:8265 "
                                                            r"is a job-server address"):
            raycluster.connect_ray()
        del os.environ["DISTILLERY_RAY_GCS_ADDRESS"]
        os.environ["RAY_ADDRESS"] = "http://127.0.0.1:8265"
        with pytest.raises(raycluster.RayAddressError, match=r"^RAY_ADDRESS=http://"):
            raycluster.connect_ray()
    assert len(calls) == 3
    loopback = ["127.0.0.1:1", "localhost:2", "LOCALHOST:3", "[::1]:4", "[::1]", "::1", "0:0:0:0:0:0:0:1",
                "::ffff:127.0.0.1", "127.0.0.2"]
    other = ["10.0.0.1:4", "head.example:5", "127.evil.example:6", "", "auto"]
    assert [raycluster.is_loopback(a) for a in loopback + other] == [True] * len(loopback) + [False] * len(other)
