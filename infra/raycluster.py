"""A local single-node Ray head (GCS, raylet, dashboard + job server), loopback only.

Why: training is submitted as Ray jobs (``ray job submit`` / ``JobSubmissionClient``) and runs
under Ray Train; a local head lets the same submission path run on a laptop or CI box.

How it is kept exact and local:

* ``ray start --head --block`` runs in the foreground of a detached process session we
  start ourselves, so the head's pid is known and all Ray daemons are its descendants /
  session members. We never call ``ray stop``: it has no way to select a cluster and stops
  every Ray process of the user on the machine.
* ``--temp-dir`` is a directory of our own (sockets, logs, session files), so nothing is
  shared with a default ``/tmp/ray`` cluster.
* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray use ``127.0.0.1`` as the node address.
  Without it, Ray 2.60 replaces ``--node-ip-address 127.0.0.1`` by the machine's routable
  IP and its gRPC servers (GCS, raylet, client server) listen on all interfaces. With it they
  listen on 127.0.0.1 only; the (unwanted here) side effect is that no other node can join.
* ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``: on SIGTERM Ray 2.60 otherwise "drains" the
  node for up to 30 s before stopping, and in practice hangs past that.
* Token authentication is pinned on, with a fresh token per ``up`` in ``STATE/ray-auth-token``
  (mode 0600): ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``. Left alone, Ray 2.60 turns
  token auth on only if ``~/.ray/auth_token`` happens to exist (any earlier local
  ``ray.init()`` creates it), so the job server would answer 401 or not depending on the
  machine's history. Loopback is not private to one user; the token (readable only by us)
  keeps other local users from submitting jobs, i.e. from running code as us.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.procs import (
    LOOPBACK,
    ServiceRecord,
    ensure_port_free,
    find_free_port,
    pid_alive,
    process_cmdline,
    process_family,
    start_detached,
    stop_pid,
    wait_for_http,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "ray"
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
# Unix socket paths are limited to 107 bytes; Ray puts "session_<date>_<pid>/sockets/plasma_store"
# (about 64 bytes with a 7-digit pid) below its temp dir.
_MAX_TEMP_DIR_LEN = 40

# Environment the head runs with (and that the stop logic relies on); see the module docstring.
RAY_HEAD_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_AUTH_MODE": "token",
}
AUTH_TOKEN_FILE = "ray-auth-token"


@dataclass(frozen=True)
class RayHead:
    """A running local Ray head.

    ``dashboard_url`` is the job-submission address (``RAY_ADDRESS`` for ``ray job submit``);
    ``gcs_address`` is what ``ray.init(address=...)`` takes for a driver on this machine.
    """

    dashboard_url: str
    gcs_address: str
    pid: int
    port: int
    gcs_port: int
    log_path: str
    temp_dir: str
    agent_port: int
    auth_token_path: str

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate to this head's dashboard / job server.

        For ``JobSubmissionClient(head.dashboard_url, headers=head.auth_headers())`` in a
        process whose environment does not carry :meth:`env` (Ray reads the auth mode once per
        process, so setting the variables after Ray initialised is not enough).
        """
        token = Path(self.auth_token_path).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def env(self) -> dict[str, str]:
        """Environment for submitting jobs to this head.

        ``RAY_ADDRESS`` is the dashboard URL, which ``ray job submit`` and
        ``JobSubmissionClient()`` use. A driver that calls ``ray.init()`` directly must instead
        pass ``address=os.environ["DISTILLERY_RAY_GCS_ADDRESS"]`` (``ray.init`` does not accept
        an ``http://`` RAY_ADDRESS). Inside a submitted job Ray sets RAY_ADDRESS itself.

        ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is needed by such a driver too: without it Ray
        rewrites ``127.0.0.1`` to the machine's routable IP, where this loopback-only head does
        not listen, and ``ray.init`` retries forever. (It also stops this shell from *joining*
        multi-node clusters; connecting as a client over ``ray://`` or HTTP is unaffected.)

        ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN_PATH`` make every Ray client (CLI, SDK, driver) send
        this head's token; the value is a file path, never the token itself.
        """
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "DISTILLERY_RAY_GCS_ADDRESS": self.gcs_address,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.auth_token_path,
        }

    def to_record(self) -> ServiceRecord:
        """The state-file entry for this head."""
        return ServiceRecord.for_process(
            SERVICE_NAME,
            self.pid,
            self.port,
            self.dashboard_url,
            self.log_path,
            extra={
                "gcs_address": self.gcs_address,
                "gcs_port": self.gcs_port,
                "temp_dir": self.temp_dir,
                "agent_port": self.agent_port,
                "auth_token_path": self.auth_token_path,
            },
        )

    @classmethod
    def from_record(cls, record: ServiceRecord) -> RayHead:
        """Rebuild from a state-file entry."""
        return cls(
            record.url,
            str(record.extra["gcs_address"]),
            record.pid,
            record.port,
            int(record.extra["gcs_port"]),
            record.log_path,
            str(record.extra["temp_dir"]),
            int(record.extra.get("agent_port", 0)),
            str(record.extra.get("auth_token_path", "")),
        )


_SHORT_TEMP_PREFIX = "distillery-ray-"


def ray_temp_dir(state_dir: str | os.PathLike[str]) -> Path:
    """The head's ``--temp-dir``: ``STATE/ray``, or a short ``/tmp/distillery-ray-<hash>``.

    The short form is used when ``STATE/ray`` is too long for Ray's Unix socket paths; the
    hash of the state dir keeps it stable and distinct per state dir. Being scratch outside
    the state dir, it is deleted when the head stops (``STATE/ray.log`` stays).
    """
    preferred = Path(state_dir).resolve() / "ray"
    if len(str(preferred)) <= _MAX_TEMP_DIR_LEN:
        return preferred
    digest = hashlib.sha1(str(preferred).encode()).hexdigest()[:10]
    # /tmp rather than $TMPDIR, which can itself be long (macOS, some CI runners).
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return base / f"{_SHORT_TEMP_PREFIX}{digest}"


def write_auth_token(path: Path) -> None:
    """Write a fresh random token (Ray's own format: 64 hex chars) readable only by us."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.chmod(path, 0o600)  # also when the file already existed with wider permissions


def ray_head_argv(
    *,
    gcs_port: int,
    dashboard_port: int,
    temp_dir: Path,
    num_cpus: int,
    num_gpus: int | None,
    object_store_memory: int | None,
    client_server_port: int,
    agent_port: int,
) -> list[str]:
    """Command line for a blocking, loopback-only Ray head (Ray 2.60 ``ray start`` flags)."""
    argv = [
        sys.executable,  # the `ray` console script, run by this very interpreter
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        LOOPBACK,
        "--port",
        str(gcs_port),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        LOOPBACK,
        "--dashboard-port",
        str(dashboard_port),
        # These default to fixed ports (10001, 52365): free ones let two heads coexist.
        "--ray-client-server-port",
        str(client_server_port),
        "--dashboard-agent-listen-port",
        str(agent_port),
        "--num-cpus",
        str(num_cpus),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        "--log-style",
        "record",
        "--log-color",
        "false",
    ]
    if num_gpus is not None:
        argv += ["--num-gpus", str(num_gpus)]
    if object_store_memory is not None:
        argv += ["--object-store-memory", str(object_store_memory)]
    return argv


def _job_server_ready(status: int, body: bytes) -> bool:
    if status != 200:
        return False
    try:
        return "ray_version" in json.loads(body)
    except ValueError:
        return False


def start_ray_head(
    state_dir: str | os.PathLike[str],
    dashboard_port: int | None = None,
    gcs_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> RayHead:
    """Start a Ray head and wait until its job server answers ``GET /api/version``.

    ``env``: variables for the head's processes, which its workers and the jobs submitted to it inherit
    (``ray job submit`` does not pass the submitter's environment on): the local stack gives it the S3
    server's and the MLflow server's, so that training on ``s3://`` and logging to MLflow work from a job.

    ``None`` ports are picked free; explicit ports that are taken raise
    :class:`infra.procs.PortInUseError` naming ``--ray-dashboard-port`` / ``--ray-port``.
    ``num_cpus`` defaults to ``os.cpu_count()``; ``object_store_memory`` (bytes) to Ray's
    default of 30% of RAM.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if dashboard_port is None:
        dashboard_port = find_free_port()
    else:
        ensure_port_free(dashboard_port, "Ray dashboard / job server", "--ray-dashboard-port")
    if gcs_port is None:
        gcs_port = find_free_port()
    else:
        ensure_port_free(gcs_port, "Ray GCS", "--ray-port")
    temp_dir = ray_temp_dir(state)
    temp_dir.mkdir(parents=True, exist_ok=True)
    agent_port = find_free_port()
    argv = ray_head_argv(
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        temp_dir=temp_dir,
        num_cpus=num_cpus or os.cpu_count() or 1,
        num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        client_server_port=find_free_port(),
        agent_port=agent_port,
    )
    token_path = state / AUTH_TOKEN_FILE
    write_auth_token(token_path)
    proc, log_path = start_detached(
        SERVICE_NAME,
        argv,
        state,
        # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner (and any state API call in a job) asks
        # this head's dashboard, not whichever Ray instance it finds on the machine.
        env={**(env or {}), **RAY_HEAD_ENV, "RAY_AUTH_TOKEN_PATH": str(token_path),
             "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{dashboard_port}"},
        # RAY_AUTH_TOKEN would take precedence over our token file.
        unset_env=("RAY_ADDRESS", "RAY_AUTH_TOKEN"),
    )
    head = RayHead(
        dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
        gcs_address=f"{LOOPBACK}:{gcs_port}",
        pid=proc.pid,
        port=dashboard_port,
        gcs_port=gcs_port,
        log_path=str(log_path),
        temp_dir=str(temp_dir),
        agent_port=agent_port,
        auth_token_path=str(token_path),
    )
    try:
        deadline = time.monotonic() + timeout
        wait_for_http(
            f"{head.dashboard_url}/api/version",
            service="Ray job server",
            pid=proc.pid,
            log_path=log_path,
            timeout=timeout,
            accept=_job_server_ready,
            headers=head.auth_headers(),
        )
        # The dashboard answers before the raylet and its agent are up; jobs are handed to
        # the head node's agent, so wait for it to report a healthy raylet too.
        wait_for_http(
            f"http://{LOOPBACK}:{agent_port}/api/local_raylet_healthz",
            service="Ray dashboard agent / raylet",
            pid=proc.pid,
            log_path=log_path,
            timeout=max(1.0, deadline - time.monotonic()),
            accept=lambda status, _body: status == 200,
        )
    except BaseException:
        stop_ray_head(head)
        raise
    return head


def head_processes(head: RayHead) -> list[int]:
    """Live pids that belong to this head.

    Its process family (descendants, process group, session) plus any process whose
    command line names this head's temp dir (daemons whose parent already exited).
    """
    pids = set(process_family(head.pid)) if pid_alive(head.pid) else set()
    temp_dir = head.temp_dir.rstrip("/")

    def names_temp_dir(arg: str) -> bool:
        return arg == temp_dir or arg.endswith("=" + temp_dir) or (temp_dir + "/") in arg

    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        if any(names_temp_dir(arg) for arg in process_cmdline(int(name))) and pid_alive(int(name)):
            pids.add(int(name))
    return sorted(pids)


def stop_ray_head(head: RayHead, timeout: float = 20.0) -> list[int]:
    """Stop exactly this head's processes (never ``ray stop``); return the pids stopped.

    A short ``/tmp/distillery-ray-*`` temp dir (see :func:`ray_temp_dir`) is removed once
    nothing runs any more; a temp dir inside the state dir is kept with its logs.
    """
    extra = head_processes(head)
    stopped = stop_pid(head.pid, name="Ray head", timeout=timeout, extra_pids=extra)
    leftover = head_processes(head)
    if leftover:
        stopped += stop_pid(leftover[0], name="Ray head leftovers", timeout=5.0, extra_pids=leftover)
    temp_dir = Path(head.temp_dir)
    if temp_dir.name.startswith(_SHORT_TEMP_PREFIX) and temp_dir.parent in (Path("/tmp"), Path(tempfile.gettempdir())):
        shutil.rmtree(temp_dir, ignore_errors=True)
    return stopped


class RayAddressError(ValueError):
    """RAY_ADDRESS names something ray.init cannot connect to; the message says what to set instead."""


_started_here = False  # this process's Ray is the local one `connect_ray` started


def connect_ray(num_cpus: int | None = None, *, temp_dir: str | None = None, dashboard: bool = False,
                object_store_memory: int | None = None):
    """Connect this driver to Ray, once per process, and return the ``ray`` module: the cluster of
    ``DISTILLERY_RAY_GCS_ADDRESS`` or ``RAY_ADDRESS`` (a GCS address, as Ray sets it inside ``ray job
    submit``), the submitting job's cluster, else a new local Ray (the embedded default) on 127.0.0.1 only.

    Loopback: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported, and without it a local
    Ray swaps 127.0.0.1 for the machine's routable IP and its GCS and raylet listen on every interface (see
    the module docstring). This may run after ``import ray``, so the driver's copy of the setting is set too.
    A cluster on other hosts is left to Ray's own settings (a driver joining one takes its node's address from
    that node's raylet either way).

    ``dashboard``: the local Ray's dashboard on a free loopback port, and ``RAY_API_SERVER_ADDRESS`` naming it
    for Ray's processes: Ray Train V2's placement-group cleaner asks the state API whether the controller
    lives, and without an address the state API looks for the Ray on the machine; beside another one (an
    ``infra.local up`` head) it finds two and the cleaner warns every few seconds for the whole run.
    """
    global _started_here
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    _started_here = False
    variable = "DISTILLERY_RAY_GCS_ADDRESS" if os.environ.get("DISTILLERY_RAY_GCS_ADDRESS") else "RAY_ADDRESS"
    address = os.environ.get(variable, "")
    if address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"{variable}={address} is a job-server address; ray.init cannot connect to it. Submit this "
            "command with `ray job submit` (Ray sets RAY_ADDRESS for the job), or set "
            "DISTILLERY_RAY_GCS_ADDRESS to the cluster's GCS address (host:port)"
        )
    in_job = "RAY_JOB_ID" in os.environ or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if (address or in_job) and not is_loopback(address):
        ray.init(address=address or "auto")
        return ray
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"):
        os.environ.setdefault(name, RAY_HEAD_ENV[name])
    from ray._private import ray_constants

    # as Ray's env_bool reads it: only "1" and "true" keep the routable address
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")
    if address:  # a head on this machine, e.g. `infra.local up`'s
        ray.init(address=address)
        return ray
    options: dict = {"include_dashboard": dashboard}
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    if dashboard:
        port = find_free_port()
        # for Ray's processes, which ray.init starts with this environment; this process does not keep it,
        # as it would override the address of every later `ray job submit` or state call made from here
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
        options.update(dashboard_host=LOOPBACK, dashboard_port=port)
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, _node_ip_address=LOOPBACK, _temp_dir=temp_dir,
                 object_store_memory=object_store_memory, **options)
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved
    _started_here = True
    return ray


def started_here() -> bool:
    """Whether this process's Ray is the local one `connect_ray` started (it never gains nodes)."""
    return _started_here


def is_loopback(address: str) -> bool:
    """Whether a ``host:port``, ``[v6]:port`` or bare host is this machine's loopback interface."""
    import ipaddress

    if address.startswith("["):
        host = address[1:].split("]", 1)[0]
    elif address.count(":") == 1:
        host = address.split(":", 1)[0]
    else:
        host = address  # a bare host, or a bare IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
