# Sourced by scripts/demo.sh and scripts/test.sh: create (once) and reuse the virtual environment .venv
# at the repository root, re-installing only when pyproject.toml or constraints.txt changes. Every package
# is installed at the version constraints.txt pins (scripts/lock.sh writes it), so a fresh machine gets
# the set the suite last passed with, not the day's newest releases.
#   DISTILLERY_CUDA=13 picks DALI's CUDA 13 wheel instead of the CUDA 12 one (default).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
cuda=${DISTILLERY_CUDA:-12}
stamp=".venv/.installed-$( (cat pyproject.toml constraints.txt; echo "cuda$cuda") | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "installing distillery and its dependencies into .venv (a few minutes the first time; log: .venv/install.log)" >&2
  {
    # torch's CUDA build; on this project's machines pip takes it from local disk
    .venv/bin/python -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1 &&
    # PIP_CONSTRAINT also pins what pip's isolated build of the editable install fetches (setuptools)
    PIP_CONSTRAINT="$PWD/constraints.txt" .venv/bin/python -m pip install -c constraints.txt -e ".[cuda$cuda,test]"
  } >.venv/install.log 2>&1 || { tail -n 40 .venv/install.log >&2; echo "install failed: see .venv/install.log" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
