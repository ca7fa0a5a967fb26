"""constraints.txt against pyproject.toml and the environment the suite runs in.

scripts/bootstrap.sh installs every package at constraints.txt's version. A dependency added to
pyproject.toml without a pin would come at the day's newest release on a fresh machine, and a pin outside
pyproject's range would make the install fail there: both are caught here, before CI. The last test says
when the running environment drifted from the pins (a package upgraded by hand): the suite's result is
then not the result a fresh machine gets.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("cuda12", "test")  # what scripts/bootstrap.sh installs by default


def _pins() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert m, f"constraints.txt:{n}: {line!r} is not NAME==VERSION (rewrite it with scripts/lock.sh)"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt:{n}: {m.group(1)} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def test_every_direct_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in constraints.txt: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"


def test_torch_pin_is_the_one_bootstrap_installs():
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pins = _pins()
    for name, version in re.findall(r"\b(torch|torchvision)==(\S+)", bootstrap):
        assert pins[name] == Version(version), f"bootstrap.sh installs {name}=={version}, constraints.txt {pins[name]}"


def test_the_environment_is_the_pinned_one():
    drifted = []
    for name, version in _pins().items():
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            continue  # pinned for another extra or platform
        if installed != version:
            drifted.append(f"{name} {installed} (pinned {version})")
    assert not drifted, ("this environment is not constraints.txt's: " + ", ".join(drifted) +
                         "; rerun scripts/bootstrap.sh, or after an upgrade on purpose, scripts/lock.sh")
