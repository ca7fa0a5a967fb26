#!/usr/bin/env bash
# A dress rehearsal of the GPU benchmark's device calls, here, before any device minute is spent: it copies
# the working tree as a device call sends it (tracked and untracked-not-ignored files, plus the carried
# folders), replays the back-to-back calls that bring DALI's wheel parts and the S3 wheels into /tmp, and
# runs the last call's command, `bash scripts/gpu_bench.sh .daliN`, under a Python like the lent machine's:
# Python 3.12 with torch 2.11.0+cu130, torchvision 0.26.0 and numpy 2.5.2 (the device tool's KINDS.md), and
# no Ray, MLflow or webdataset. With no GPU the rows run on the CPU: what it checks is the install from the
# parts, the imports under that Python and torch, and that every row runs (default --quick, CI size).
#
# Usage (from the repository root):  bash scripts/rehearse-gpu-bench.sh [bench_gpu options]
# Needs: a python3.12 here (PYTHON312=PATH to choose one) and the package registry (~4 GB into
# /tmp/rehearse-gpu-venv once: torch's CUDA build and its libraries). Makes .dali* and .s3wheels when missing.
# Leaves the table and logs in /tmp/rehearse-gpu/out; the calls' /tmp is a fresh folder (GPU_BENCH_TMP).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=
for candidate in ${PYTHON312:-python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null)}; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py=$candidate; break; fi
done
if [ -z "$py" ]; then
  echo "rehearse-gpu-bench: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
  exit 2
fi
venv=/tmp/rehearse-gpu-venv
if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -c 'import torch, timm, torchvision' 2>/dev/null; then
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python3" -m pip install -q torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 timm pillow pyarrow \
    fsspec pyyaml tqdm psutil
fi
ls -d .dali[0-9]* >/dev/null 2>&1 || bash ../shared/tools/dali-wheel-parts.sh
[ -d .s3wheels ] || bash scripts/s3-wheel-parts.sh
mapfile -t parts < <(ls -d .dali[0-9]* | sort -V)
last=${parts[-1]}

rm -rf /tmp/rehearse-gpu
scratch=$(mktemp -d /tmp/rehearse-gpu-tmp.XXXXXX)  # the machine's /tmp, as far as gpu_bench.sh is concerned
trap 'rm -rf "$scratch" /tmp/rehearse-gpu/repo' EXIT
mkdir -p /tmp/rehearse-gpu/repo /tmp/rehearse-gpu/out
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t /tmp/rehearse-gpu/repo
cp -r "${parts[@]}" .s3wheels /tmp/rehearse-gpu/repo/
echo "rehearse-gpu-bench: the tree a call sends is $(du -sh --exclude='.dali*' --exclude=.s3wheels \
  /tmp/rehearse-gpu/repo | cut -f1) besides the carried folders"
cd /tmp/rehearse-gpu/repo
for part in "${parts[@]:0:${#parts[@]}-1}"; do mkdir -p "$scratch/parts" && cp "$part"/* "$scratch/parts/"; done
mkdir -p "$scratch/s3w" && cp .s3wheels/* "$scratch/s3w/"
[ $# -gt 0 ] || set -- --quick
env -u VIRTUAL_ENV -u PYTHONPATH PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" OUT=/tmp/rehearse-gpu/out \
  GPU_BENCH_TMP="$scratch" PYTHONUNBUFFERED=1 bash scripts/gpu_bench.sh "$last" "$@"
# gpu_bench.sh goes on past a failed install (on the machine, the other rows are worth their minutes): here
# that, or any row that failed, is what the rehearsal is for
if grep '^gpu_bench.sh: ' /tmp/rehearse-gpu/out/gpu.txt >&2 || grep '| failed: ' /tmp/rehearse-gpu/out/BENCHMARKS-gpu.md >&2
then
  echo "rehearse-gpu-bench: FAILED (above); logs in /tmp/rehearse-gpu/out" >&2
  exit 1
fi
echo "rehearse-gpu-bench: passed; the table is /tmp/rehearse-gpu/out/BENCHMARKS-gpu.md (from $repo)"
