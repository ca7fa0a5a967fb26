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
# $OUT/BENCHMARKS-gpu.md.profile.txt. Pass --max-seconds so that the rows end before that limit (it counts
# from this script's start). An install that fails is said in $OUT/gpu.txt and fails only the rows needing it.
set -euo pipefail
started=$(date +%s)  # --max-seconds counts from here: unpacking DALI and the imports come out of it too
cd "$(dirname "$0")/.."
last=${1:-}
case "$last" in -*) last= ;; *) shift || true ;; esac  # no parts folder given: the options start at once
tmp=${GPU_BENCH_TMP:-/tmp}  # where the calls left the parts (parts/, s3w/) and where the installs go
out=${OUT:-/tmp/bench-gpu-out}
mkdir -p "$tmp/parts" "$out"
: >"$out/gpu.txt"
say() { echo "gpu_bench.sh: $*" | tee -a "$out/gpu.txt" >&2; }
# an install that fails costs its rows, not the run: the benchmark's modules import DALI and the S3 packages
# only inside the rows that use them, and those rows then say "failed" in the table
if [ -n "$last" ]; then cp "$last"/* "$tmp/parts/" || say "copying the parts of $last failed"; fi
if [ -d "$tmp/s3w" ] && [ ! -d "$tmp/site-s3/moto" ]; then  # carried .s3wheels: the rows through the S3 store
  python3 -m pip install -q --no-index --no-deps --target "$tmp/site-s3" "$tmp"/s3w/*.whl \
    || say "installing the S3 wheels from $tmp/s3w failed: the S3 rows will fail"
fi
if ! python3 -c "import nvidia.dali" 2>/dev/null && [ ! -d "$tmp/site/nvidia/dali" ]; then
  rm -rf "$tmp/w" && mkdir -p "$tmp/w"
  parts=$(find "$tmp/parts" -maxdepth 1 -type f -name 'part*' | sort)
  # shellcheck disable=SC2086
  if [ -z "$parts" ] || ! { cat $parts | tar xf - -C "$tmp/w" \
       && python3 -m pip install -q --no-index --no-deps --target "$tmp/site" "$tmp"/w/*.whl; }; then
    rm -rf "$tmp/site"  # half installed is not installed: the next call tries again (pip --target skips what exists)
    say "installing DALI from the parts in $tmp/parts failed (were all of them carried?): the DALI rows will fail"
  fi
fi
# the S3 packages last: where the machine has a package already, its own version stays in charge
export PYTHONPATH=$PWD:$tmp/site${PYTHONPATH:+:$PYTHONPATH}:$tmp/site-s3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/gpu.txt" || true
df -h /dev/shm | tee -a "$out/gpu.txt" || true  # the peers' DataLoader workers hand batches over through it
python3 -c "import sys, numpy, timm, torch; print('Python', sys.version.split()[0], 'torch', torch.__version__, \
  'timm', timm.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt" || say "torch/timm/numpy missing"
python3 -c "import nvidia.dali; print('DALI', nvidia.dali.__version__)" | tee -a "$out/gpu.txt" \
  || say "DALI does not import: the DALI rows will fail"
python3 -m trainer.bench_gpu --started-at "$started" --write "$out/BENCHMARKS-gpu.md" "$@" 2>"$out/bench_gpu.log"
