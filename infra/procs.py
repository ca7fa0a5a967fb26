"""Process and port helpers shared by the local stack (S3 server, MLflow server, Ray head).

Why this module exists: every service of the local stack is a *real* process that must be
started detached (so it outlives the ``python -m infra.local up`` command that started it),
found again later by the pid recorded in a state file, and stopped exactly - without broad
``pkill``-style matching that could hit another user's or another checkout's servers.

Everything binds to ``127.0.0.1`` only. Process inspection uses ``/proc`` (Linux), which is
what the training machines run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import fsspec

from pipeline.storage import write_json

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STATE_FILE_NAME = "state.json"


class PortInUseError(RuntimeError):
    """A port the stack needs is already bound by something else."""


class ServiceStartError(RuntimeError):
    """A service process died or did not answer in time; the message carries its log tail."""


class ProcessStopError(RuntimeError):
    """A process (or one of its process group) survived SIGTERM and SIGKILL."""


# --------------------------------------------------------------------------- ports


def find_free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that the kernel reports free right now.

    The port is released before returning, so another process could grab it in between;
    callers start their server immediately, which is good enough for a local stack and tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_port_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on ``host:port`` and we could bind it ourselves.

    Both a connect test (something answers) and a bind test (something holds the port without
    answering) are done. The bind uses ``SO_REUSEADDR`` like the servers themselves, so
    connections of a just-stopped server lingering in TIME_WAIT do not count as "taken".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ensure_port_free(port: int, service: str, flag: str | None = None, host: str = LOOPBACK) -> None:
    """Raise :class:`PortInUseError` naming the port, the service and the flag to change it.

    Example message: ``port 9000 for the S3 server is taken: stop what holds it or pass --s3-port``.
    """
    if is_port_free(port, host):
        return
    hint = f"stop what holds it or pass {flag}" if flag else "stop what holds it or choose another port"
    raise PortInUseError(f"port {port} for the {service} is taken: {hint}")


# --------------------------------------------------------------------------- processes


class _Stat(NamedTuple):
    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int  # clock ticks after boot when the process started


def _proc_stat(pid: int) -> _Stat | None:
    """``/proc/PID/stat`` fields we need, or None if the process does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return _Stat(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]))


def _live_stats() -> dict[int, _Stat]:
    """Stat of every live (non-zombie) process."""
    stats = {}
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat.state not in ("Z", "X"):
            stats[pid] = stat
    return stats


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (a zombie has exited; only its entry remains)."""
    if pid <= 0:
        return False
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is not None:
        return stat.state not in ("Z", "X")
    if Path("/proc/self").exists():
        return False  # Linux: no /proc entry means gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it does not exist.

    Recorded next to the pid so a pid reused by an unrelated process (after a reboot, say)
    is not mistaken for, or stopped as, our server.
    """
    stat = _proc_stat(pid)
    return None if stat is None else stat.start_ticks


def process_cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (empty when it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    return sorted(pid for pid, stat in _live_stats().items() if stat.pgrp == pgid)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) pids in session ``sid`` (Ray workers change group but keep the session)."""
    return sorted(pid for pid, stat in _live_stats().items() if stat.session == sid)


def descendants(pid: int) -> list[int]:
    """Live pids below ``pid`` in the process tree (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for other, stat in _live_stats().items():
        children.setdefault(stat.ppid, []).append(other)
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return sorted(found)


def process_family(pid: int) -> list[int]:
    """``pid`` plus everything it started that we can still attribute to it.

    That is its descendants, and, when ``pid`` leads its own process group / session (as
    :func:`start_detached` arranges), the members of that group and session - which catches
    processes whose parent already exited. Never includes the calling process's own group.
    """
    stats = _live_stats()
    family = {pid} if pid in stats else set()
    family.update(descendants(pid))
    own = os.getpid()
    if pid != os.getpgrp():
        family.update(p for p, st in stats.items() if st.pgrp == pid or st.session == pid)
    family.discard(own)
    return sorted(family)


def start_detached(
    name: str,
    argv: Sequence[str],
    state_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    unset_env: Iterable[str] = (),
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``argv`` in its own process session, output to ``STATE_DIR/<name>.log``.

    ``start_new_session=True`` makes the process a session and process-group leader, so it
    survives the terminal/CLI that started it and :func:`stop_pid` can signal it together with
    any helper processes it forks. ``env`` entries are added to the current environment and
    ``unset_env`` names removed from it. The venv's ``bin`` (that of ``sys.executable``) is put
    first on ``PATH`` so that console scripts and ``python`` inside the service resolve to
    this interpreter. Returns the Popen handle and the log path.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / f"{name}.log"
    full_env = dict(os.environ)
    bin_dir = os.path.dirname(sys.executable)
    full_env["PATH"] = os.pathsep.join([bin_dir, *[p for p in full_env.get("PATH", "").split(os.pathsep) if p]])
    if env:
        full_env.update(env)
    for key in unset_env:
        full_env.pop(key, None)
    log.info("starting %s: %s (log %s)", name, " ".join(argv), log_path)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
            close_fds=True,
        )
    return proc, log_path


def log_tail(log_path: str | os.PathLike[str] | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    if log_path is None:
        return ""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_get(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``url``; return ``(status, body)`` for any HTTP answer, 4xx/5xx included.

    Proxies are bypassed: the stack is loopback-only and an ``HTTP_PROXY`` in the environment
    must not reroute 127.0.0.1.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with opener.open(request, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read() if err.fp else b""


def wait_for_http(
    url: str,
    *,
    service: str,
    pid: int | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    accept: Callable[[int, bytes], bool] | None = None,
    interval: float = 0.25,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll ``url`` until it answers acceptably, the process dies, or ``timeout`` seconds pass.

    ``accept(status, body)`` decides what "ready" means; by default any HTTP answer below 500
    counts. ``headers`` are sent with each request (e.g. an ``Authorization`` header).
    On failure raises :class:`ServiceStartError` including the tail of ``log_path``.
    """
    accept = accept or (lambda status, _body: status < 500)
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        if pid is not None and not pid_alive(pid):
            raise ServiceStartError(
                f"{service} (pid {pid}) exited before {url} answered; log {log_path}:\n{log_tail(log_path)}"
            )
        try:
            status, body = http_get(url, timeout=min(2.0, max(0.1, deadline - time.monotonic())), headers=headers)
            if accept(status, body):
                log.info("%s answers at %s (HTTP %d)", service, url, status)
                return
            last_error = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as err:
            last_error = str(err)
        if time.monotonic() >= deadline:
            raise ServiceStartError(
                f"{service} did not answer at {url} within {timeout:.0f} s ({last_error}); "
                f"log {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(interval)


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until all ``pids`` are gone (or zombies); return the survivors."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def stop_pid(
    pid: int,
    *,
    name: str = "process",
    timeout: float = 10.0,
    extra_pids: Iterable[int] = (),
) -> list[int]:
    """Stop ``pid`` and its family: SIGTERM, wait up to ``timeout``, SIGKILL, confirm gone.

    The family (see :func:`process_family`) is snapshotted *before* signalling, so children
    that get re-parented to init during shutdown are still waited for. ``extra_pids`` are
    handled the same way. Returns the pids that were stopped. Raises
    :class:`ProcessStopError` if anything survives SIGKILL.
    """
    targets = sorted(set(process_family(pid)) | {p for p in extra_pids if pid_alive(p)})
    targets = [p for p in targets if p != os.getpid()]
    if not targets:
        log.info("%s (pid %d) is not running", name, pid)
        return []
    log.info("stopping %s (pid %d, %d processes)", name, pid, len(targets))
    _signal_all(targets, signal.SIGTERM)
    survivors = _wait_gone(targets, timeout)
    # Anything that appeared in the family while shutting down (e.g. a respawned helper).
    late = [p for p in process_family(pid) if p not in targets and p != os.getpid()]
    if late:
        _signal_all(late, signal.SIGTERM)
        survivors = sorted(set(survivors) | set(_wait_gone(late, 2.0)))
    if survivors:
        log.warning("%s: %s survived SIGTERM for %.0f s; sending SIGKILL", name, survivors, timeout)
        _signal_all(survivors, signal.SIGKILL)
        survivors = _wait_gone(survivors, 5.0)
    if survivors:
        raise ProcessStopError(f"{name}: processes {survivors} survived SIGKILL")
    log.info("%s (pid %d) stopped", name, pid)
    return sorted(set(targets) | set(late))


# --------------------------------------------------------------------------- state file


@dataclass(frozen=True)
class ServiceRecord:
    """One running service as recorded in the state file."""

    name: str
    pid: int
    port: int
    url: str
    log_path: str
    extra: dict[str, Any] = field(default_factory=dict)
    start_ticks: int = 0  # process_start_ticks(pid) when recorded; 0 = unknown

    @classmethod
    def for_process(
        cls, name: str, pid: int, port: int, url: str, log_path: str, extra: Mapping[str, Any] | None = None
    ) -> ServiceRecord:
        """A record for a running process, with its start time taken now."""
        return cls(name, pid, port, url, log_path, dict(extra or {}), process_start_ticks(pid) or 0)

    def is_current(self) -> bool:
        """True when the recorded pid is alive *and* is still the process that was recorded."""
        if not pid_alive(self.pid):
            return False
        return self.start_ticks == 0 or process_start_ticks(self.pid) == self.start_ticks

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceRecord:
        """Inverse of :meth:`to_json`; unknown keys are ignored."""
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            port=int(data["port"]),
            url=str(data["url"]),
            log_path=str(data["log_path"]),
            extra=dict(data.get("extra") or {}),
            start_ticks=int(data.get("start_ticks", 0)),
        )


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the state file of ``state_dir`` lives."""
    return Path(state_dir) / STATE_FILE_NAME


def write_state(state_dir: str | os.PathLike[str], services: Iterable[ServiceRecord]) -> Path:
    """Write the state file atomically (temp file in the same dir, fsync, ``os.replace``)."""
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": 1, "services": [s.to_json() for s in services]}
    write_json(fsspec.filesystem("file"), str(path), payload)  # temp file, fsync, os.replace
    return path


def read_state(state_dir: str | os.PathLike[str]) -> list[ServiceRecord]:
    """The services recorded in ``state_dir`` (empty list when there is no state file)."""
    path = state_path(state_dir)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [ServiceRecord.from_json(item) for item in payload.get("services", [])]


def remove_state(state_dir: str | os.PathLike[str]) -> None:
    """Delete the state file if present."""
    with contextlib.suppress(FileNotFoundError):
        state_path(state_dir).unlink()
