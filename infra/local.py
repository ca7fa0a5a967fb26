"""The local stack: S3 server (moto), MLflow tracking server and Ray head, as real processes.

``python -m infra.local up|down|status|env`` starts, stops and inspects them. What was
started is recorded in ``STATE_DIR/state.json`` (pid, port, url, log of each service), and
``down`` stops exactly those processes - nothing is found by name.

``up`` prints ``export`` lines on stdout (progress goes to stderr), so either paste them or
``eval "$(python -m infra.local up)"``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra import objectstore, raycluster, tracking
from infra.procs import (
    PortInUseError,
    ProcessStopError,
    ServiceRecord,
    ServiceStartError,
    ensure_port_free,
    http_get,
    pid_alive,
    read_state,
    remove_state,
    state_path,
    write_state,
)

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = ".distillery/local"
SERVICES: tuple[str, ...] = ("s3", "mlflow", "ray")
SERVICE_TITLES = {"s3": "S3 server (moto)", "mlflow": "MLflow tracking server", "ray": "Ray head"}


class StackError(RuntimeError):
    """A user-facing failure of ``up``/``down`` (message is printed as is)."""


class StackAlreadyRunning(StackError):
    """``up`` was asked for while services recorded in the state dir are still alive."""


@dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` found for one recorded service."""

    name: str
    pid: int
    url: str
    alive: bool
    answers: bool

    @property
    def healthy(self) -> bool:
        """Process alive and endpoint answering."""
        return self.alive and self.answers


@dataclass(frozen=True)
class Ports:
    """Requested ports; ``None`` means pick a free one."""

    s3: int | None = objectstore.DEFAULT_PORT
    mlflow: int | None = tracking.DEFAULT_PORT
    ray_dashboard: int | None = raycluster.DEFAULT_DASHBOARD_PORT
    ray_gcs: int | None = raycluster.DEFAULT_GCS_PORT


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise ``up``/``down`` on one state dir (two concurrent ``up`` must not both start)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    ignore = state_dir / ".gitignore"
    if not ignore.exists():
        # Logs, the MLflow DB and Ray's session files must never end up in a commit.
        ignore.write_text("*\n")


def _stop_record(record: ServiceRecord) -> None:
    if record.name == "ray":
        raycluster.stop_ray_head(raycluster.RayHead.from_record(record))
    elif record.name == "mlflow":
        tracking.stop_tracking_server(tracking.TrackingServer.from_record(record))
    else:
        objectstore.stop_object_store(objectstore.ObjectStore.from_record(record))


def _check_ports(only: Sequence[str], ports: Ports) -> None:
    """Fail before starting anything if an explicitly requested port is taken."""
    checks = [
        ("s3", ports.s3, "S3 server", "--s3-port"),
        ("mlflow", ports.mlflow, "MLflow server", "--mlflow-port"),
        ("ray", ports.ray_dashboard, "Ray dashboard / job server", "--ray-dashboard-port"),
        ("ray", ports.ray_gcs, "Ray GCS", "--ray-port"),
    ]
    for name, port, service, flag in checks:
        if name in only and port is not None:
            ensure_port_free(port, service, flag)


def up(
    state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
    only: Sequence[str] = SERVICES,
    ports: Ports | None = None,
    ray_num_cpus: int | None = None,
    ray_object_store_memory: int | None = None,
) -> list[ServiceRecord]:
    """Start the selected services and record them; return their records.

    Raises :class:`StackAlreadyRunning` if services recorded in ``state_dir`` are alive,
    :class:`infra.procs.PortInUseError` if a requested port is taken (before anything starts).
    ``ports=None`` means the defaults of :class:`Ports`. If a service fails to start, the
    ones already started are stopped again.
    A state file whose processes are all gone (machine rebooted, killed by hand) is replaced.
    """
    unknown = [name for name in only if name not in SERVICES]
    if unknown:
        raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    ports = ports or Ports()
    state = Path(state_dir).resolve()
    with _locked(state):
        existing = read_state(state)
        alive = [r for r in existing if r.is_current()]
        if alive:
            running = ", ".join(f"{r.name} (pid {r.pid}, {r.url})" for r in alive)
            raise StackAlreadyRunning(
                f"the local stack in {state} is already running: {running}. "
                "Run `python -m infra.local down` first, or pass another --state-dir."
            )
        if existing:
            log.warning("replacing stale state %s (none of its processes is alive)", state_path(state))
            remove_state(state)
        _check_ports(only, ports)
        _prepare_state_dir(state)
        records: list[ServiceRecord] = []
        try:
            for name in SERVICES:
                if name not in only:
                    continue
                print(f"starting {SERVICE_TITLES[name]} ...", file=sys.stderr, flush=True)
                if name == "s3":
                    record = objectstore.start_object_store(state, port=ports.s3).to_record()
                elif name == "mlflow":
                    record = tracking.start_tracking_server(state, port=ports.mlflow).to_record()
                else:
                    record = raycluster.start_ray_head(
                        state,
                        dashboard_port=ports.ray_dashboard,
                        gcs_port=ports.ray_gcs,
                        num_cpus=ray_num_cpus,
                        object_store_memory=ray_object_store_memory,
                        env=service_env(records),  # its workers and jobs reach the S3 and MLflow servers
                    ).to_record()
                records.append(record)
                # Recorded after each service, so a crash half-way still leaves `down` a record.
                write_state(state, records)
        except BaseException:
            for record in reversed(records):
                with contextlib.suppress(Exception):
                    _stop_record(record)
            remove_state(state)
            raise
        return records


def down(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> list[ServiceRecord]:
    """Stop exactly the recorded services (Ray, MLflow, S3 order) and remove the state file.

    Returns the records that were stopped. If a process survives, the state file is kept
    (so ``down`` can be retried) and :class:`StackError` is raised.
    """
    state = Path(state_dir).resolve()
    with _locked(state):
        records = read_state(state)
        failures: list[str] = []
        stopped: list[ServiceRecord] = []
        # Reverse start order: Ray first (its jobs may be using S3 and MLflow).
        order = {name: i for i, name in enumerate(SERVICES)}
        for record in sorted(records, key=lambda r: order.get(r.name, -1), reverse=True):
            if pid_alive(record.pid) and not record.is_current():
                log.warning("pid %d of %s now belongs to another process; not touching it", record.pid, record.name)
                stopped.append(record)
                continue
            try:
                _stop_record(record)
                stopped.append(record)
            except ProcessStopError as err:
                failures.append(str(err))
        if failures:
            write_state(state, [r for r in records if r not in stopped])
            raise StackError("; ".join(failures))
        remove_state(state)
        return stopped


def _answers(record: ServiceRecord) -> bool:
    paths = {"s3": "/moto-api/", "mlflow": "/health", "ray": "/api/version"}
    headers: dict[str, str] = {}
    try:
        if record.name == "ray":
            headers = raycluster.RayHead.from_record(record).auth_headers()
        status, _ = http_get(record.url + paths.get(record.name, "/"), timeout=2.0, headers=headers)
    except OSError:
        return False
    return status == 200


def status(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> list[ServiceStatus]:
    """For each recorded service: is its pid alive, does its endpoint answer."""
    result = []
    for record in read_state(Path(state_dir).resolve()):
        alive = record.is_current()
        result.append(ServiceStatus(record.name, record.pid, record.url, alive, alive and _answers(record)))
    return result


def service_env(records: Sequence[ServiceRecord]) -> dict[str, str]:
    """The environment variables that point clients at the recorded services."""
    env: dict[str, str] = {}
    for record in records:
        if record.name == "s3":
            env.update(objectstore.ObjectStore.from_record(record).env())
        elif record.name == "mlflow":
            env.update(tracking.TrackingServer.from_record(record).env())
        elif record.name == "ray":
            env.update(raycluster.RayHead.from_record(record).env())
    return env


def export_lines(records: Sequence[ServiceRecord]) -> list[str]:
    """Shell ``export`` lines (with comments) for the recorded services."""
    lines = []
    for record in records:
        lines.append(f"# {SERVICE_TITLES.get(record.name, record.name)}: {record.url} (pid {record.pid})")
        if record.name == "s3":
            lines.append(
                f"# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are moto's fixed TEST keys "
                f"({objectstore.TEST_ACCESS_KEY!r}), not secrets; the bucket is s3://distillery"
            )
        if record.name == "ray":
            lines.append("# RAY_ADDRESS is for `ray job submit`; ray.init() takes address=$DISTILLERY_RAY_GCS_ADDRESS")
            lines.append("# RAY_AUTH_TOKEN_PATH names the file holding this head's token (the token is not printed)")
        lines += [f"export {key}={shlex.quote(value)}" for key, value in service_env([record]).items()]
    return lines


def _format_status(statuses: Sequence[ServiceStatus]) -> list[str]:
    lines = []
    for st in statuses:
        state = "running" if st.healthy else ("not answering" if st.alive else "not running")
        lines.append(f"{st.name:<7} pid {st.pid:<8} {state:<14} {st.url}")
    return lines


def _parse_only(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(SERVICES)} (got {value!r})")
    return names


def _port(value: str) -> int | None:
    """A port number; 0 means "pick a free one"."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return port or None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.local",
        description="Start/stop the local S3 (moto), MLflow and Ray services as real processes.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="default: %(default)s")
    parser.add_argument("--only", type=_parse_only, default=list(SERVICES), help="e.g. s3,mlflow")
    parser.add_argument("--s3-port", type=_port, default=objectstore.DEFAULT_PORT, help="0: any free port")
    parser.add_argument("--mlflow-port", type=_port, default=tracking.DEFAULT_PORT, help="0: any free port")
    parser.add_argument(
        "--ray-dashboard-port", type=_port, default=raycluster.DEFAULT_DASHBOARD_PORT, help="0: any free port"
    )
    parser.add_argument(
        "--ray-port", type=_port, default=raycluster.DEFAULT_GCS_PORT, help="Ray GCS port; 0: any free port"
    )
    parser.add_argument("--ray-num-cpus", type=int, default=None, help="default: all cores")
    parser.add_argument("--ray-object-store-mb", type=int, default=None, help="default: Ray's (30%% of RAM)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is started/stopped")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "up":
            records = up(
                args.state_dir,
                only=args.only,
                ports=Ports(args.s3_port, args.mlflow_port, args.ray_dashboard_port, args.ray_port),
                ray_num_cpus=args.ray_num_cpus,
                ray_object_store_memory=None
                if args.ray_object_store_mb is None
                else args.ray_object_store_mb * 1024 * 1024,
            )
            print(f"# local stack up; state in {state_path(Path(args.state_dir).resolve())}")
            print("\n".join(export_lines(records)))
            print(f"local stack is up ({', '.join(r.name for r in records)}).", file=sys.stderr)
            return 0
        if args.command == "down":
            stopped = down(args.state_dir)
            if stopped:
                names = ", ".join(f"{r.name} (pid {r.pid})" for r in stopped)
                print(f"stopped {names}; state removed")
            else:
                print(f"nothing recorded in {Path(args.state_dir).resolve()}; nothing to stop")
            return 0
        if args.command == "env":
            records = read_state(Path(args.state_dir).resolve())
            if not records:
                print(f"the local stack is not running (no state in {args.state_dir})", file=sys.stderr)
                return 1
            print("\n".join(export_lines(records)))
            return 0
        statuses = status(args.state_dir)
        if not statuses:
            print(f"the local stack is not running (no state in {Path(args.state_dir).resolve()})")
            return 1
        print("\n".join(_format_status(statuses)))
        return 0 if all(st.healthy for st in statuses) else 1
    except (StackError, PortInUseError, ServiceStartError, ProcessStopError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
