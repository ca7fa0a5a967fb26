"""Security properties that hold by construction, checked so that they keep holding:

* every server `infra` starts (S3, MLflow, Ray head), and the embedded Ray, listens on loopback only;
* storage URLs are storage: a webdataset-style ``pipe:`` command is refused, never run;
* nothing in the code unpickles data it reads (shards, caches, checkpoints, teacher files): ``torch.load``
  always with ``weights_only=True``, no ``pickle``/``marshal``/``yaml.load``/``eval``, no ``shell=True``.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from infra.procs import process_family
from infra.raycluster import head_processes
from pipeline.storage import Location

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "teacher_cache", "trainer", "infra")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _address(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6} ("0100007F" or 32 hex digits) as text."""
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four little-endian 32-bit words
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped and f"::ffff:{address.ipv4_mapped}" or address)


def listening(pids: list[int]) -> dict[int, set[tuple[str, int]]]:
    """pid -> the (address, port) of every TCP socket it listens on (from /proc, no extra package)."""
    sockets: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    host, port = fields[1].split(":")
                    sockets[fields[9]] = (_address(host), int(port, 16))
    out: dict[int, set[tuple[str, int]]] = {}
    for pid in pids:
        links = []
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd, for one)
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        found = {sockets[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in sockets}
        if found:
            out[pid] = found
    return out


def test_proc_parsing_sees_a_known_listener() -> None:
    import socket

    with socket.socket() as a, socket.socket(socket.AF_INET6) as b:
        a.bind(("127.0.0.1", 0))
        a.listen()
        b.bind(("::", 0))
        b.listen()
        mine = listening([os.getpid()])[os.getpid()]
        assert ("127.0.0.1", a.getsockname()[1]) in mine and ("::", b.getsockname()[1]) in mine


@pytest.mark.s3
def test_every_server_infra_starts_listens_on_loopback_only(object_store: Any, mlflow_server: Any,
                                                           ray_head: Any) -> None:
    services = {"S3 (moto)": process_family(object_store.pid), "MLflow": process_family(mlflow_server.pid),
                "Ray head": head_processes(ray_head)}
    for service, pids in services.items():
        sockets = listening(pids)
        assert sockets, f"{service}: found no listening socket, so the check would prove nothing"
        exposed = {(pid, addr, port) for pid, found in sockets.items() for addr, port in found if addr not in LOOPBACK}
        assert not exposed, f"{service} listens beyond loopback: {sorted(exposed)}"


def test_the_embedded_ray_listens_on_loopback_only_even_when_ray_was_imported_first() -> None:
    """The local Ray of `trainer.main` / `teacher-cache build`. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at
    import: set only after `import ray`, its GCS and raylet listened on every interface, at the routable IP."""
    code = textwrap.dedent("""
        import json, os, sys
        import ray
        from infra.procs import process_family
        from infra.raycluster import connect_ray
        from tests.test_security import LOOPBACK, listening
        connect_ray(1, temp_dir=sys.argv[1], dashboard=True)
        found = listening([os.getpid(), *process_family(os.getpid())])
        print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "sockets": sum(map(len, found.values())),
                          "exposed": sorted(f"{pid} {a}:{port}" for pid, s in found.items() for a, port in s
                                            if a not in LOOPBACK)}))
    """)
    from ray._private.services import node_ip_address_from_perspective

    if node_ip_address_from_perspective() == "127.0.0.1":
        pytest.skip("this machine has no routable address, so Ray would take loopback anyway: proves nothing")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "DISTILLERY_RAY_GCS_ADDRESS")}
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # Ray's socket paths must stay short
    try:
        out = subprocess.run([sys.executable, "-c", code, temp], env=env, capture_output=True, text=True,
                             timeout=180, cwd=REPO)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sockets"] >= 3, f"found {report['sockets']} listening sockets: the check would prove nothing"
    assert report["gcs"].startswith("127.0.0.1:") and not report["exposed"], report


@pytest.mark.parametrize("url", ["pipe:curl -s http://example.com/shard.tar", "pipe://aws s3 cp - x"])
def test_command_urls_are_refused_not_run(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pipe:.*not a storage URL"):
        Location(url).fs_and_path()


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_code_never_unpickles_what_it_reads() -> None:
    problems = []
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(files) > 40
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle", "shelve") for n in names):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} imports a pickle module")
        for call in _calls(tree):
            name = _name(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            where = f"{path.relative_to(REPO)}:{call.lineno} {name}"
            if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where} without weights_only=True")
            builtin = isinstance(call.func, ast.Name) and name in ("eval", "exec")
            if builtin or name.endswith(("yaml.load", "yaml.unsafe_load")):
                problems.append(where)
            shell = keywords.get("shell")
            if isinstance(shell, ast.Constant) and shell.value is True:
                problems.append(f"{where} with shell=True")
    assert not problems, "\n".join(problems)
