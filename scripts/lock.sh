#!/usr/bin/env bash
# Rewrite constraints.txt from what .venv holds now: the exact versions of every dependency, direct and
# indirect, that scripts/bootstrap.sh then installs everywhere. Without them a fresh machine (CI) takes
# each package's newest release of the day, and one upstream release can change a run or break the suite
# between two identical commits. Upgrade on purpose: install the new versions into .venv, run
# scripts/test.sh, then this script, and commit constraints.txt with the result.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Exact versions scripts/bootstrap.sh installs (pip -c). Made by scripts/lock.sh from a .venv whose"
  echo "# test suite passed; edit through that script, not by hand."
  .venv/bin/python -m pip freeze --all --exclude pip --exclude-editable --disable-pip-version-check |
    grep -v '^distillery'  # --all: setuptools (torch needs it) and wheel; pip is the interpreter's own
} >constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages" >&2
