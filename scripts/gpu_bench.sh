#!/usr/bin/env bash
# Issue 8's GPU benchmark on a lent GPU machine (no package registry, no Ray, no MLflow there), in the last
# of a run of back-to-back device calls that carry DALI's wheel parts (the machine keeps /tmp while warm):
#
#   here, once:         bash ../shared/tools/dali-wheel-parts.sh          # -> .dali0 .. .daliN (52 MB each)
#   device calls 0..N-1: carry [".daliK"], command: mkdir -p /tmp/parts && cp .daliK/* /tmp/parts/
#   optionally (the rows through the local S3 store): bash scripts/s3-wheel-parts.sh here, then a call
#                        carrying [".s3wheels"]: mkdir -p /tmp/s3w && cp .s3wheels/* /tmp/s3w/
#   device call N:       carry [".daliN"], command: bash scripts/gpu_bench.sh .daliN [bench_gpu options]
#
# It installs DALI from the parts into /tmp/site (once per machine), runs `python -m trainer.bench_gpu`
# and leaves the table in $OUT/BENCHMARKS-gpu.md (append it to BENCHMARKS.md) and the log beside it; the
# table so far is rewritten after every row to $OUT/BENCHMARKS-gpu.md.partial, so a run killed at the device
# limit still brings back what it measured, and the profiler's table of the profile row is
# $OUT/BENCHMARKS-gpu.md.profile.txt. Pass --max-seconds so that the rows end before that limit.
set -euo pipefail
cd "$(dirname "$0")/.."
last=${1:-}
shift || true
tmp=${GPU_BENCH_TMP:-/tmp}  # where the calls left the parts (parts/, s3w/) and where the installs go
mkdir -p "$tmp/parts"
if [ -n "$last" ]; then cp "$last"/* "$tmp/parts/"; fi
if [ -d "$tmp/s3w" ] && [ ! -d "$tmp/site-s3/moto" ]; then  # carried .s3wheels: the rows through the S3 store
  python3 -m pip install -q --no-index --no-deps --target "$tmp/site-s3" "$tmp"/s3w/*.whl
fi
if ! python3 -c "import nvidia.dali" 2>/dev/null; then
  if [ ! -d "$tmp/site/nvidia/dali" ]; then
    rm -rf "$tmp/w" && mkdir -p "$tmp/w"
    # shellcheck disable=SC2046
    cat $(ls "$tmp"/parts/part* | sort) | tar xf - -C "$tmp/w"
    python3 -m pip install -q --no-index --no-deps --target "$tmp/site" "$tmp"/w/*.whl
  fi
fi
# the S3 packages last: where the machine has a package already, its own version stays in charge
export PYTHONPATH=$PWD:$tmp/site${PYTHONPATH:+:$PYTHONPATH}:$tmp/site-s3
out=${OUT:-/tmp/bench-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt" || true
df -h /dev/shm | tee -a "$out/gpu.txt" || true  # the peers' DataLoader workers hand batches over through it
python3 -c "import sys, nvidia.dali, numpy, timm, torch; print('Python', sys.version.split()[0], 'DALI', \
  nvidia.dali.__version__, 'torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__)" \
  | tee -a "$out/gpu.txt"
python3 -m trainer.bench_gpu --write "$out/BENCHMARKS-gpu.md" "$@" 2>"$out/bench_gpu.log"
