#!/usr/bin/env bash
# s3fs and moto's server (and what they need) as Python 3.12 x86-64 wheels in the git-ignored folder
# .s3wheels (~45 MB: one device call carries it), for the GPU benchmark's rows through the local
# S3-protocol store on a GPU machine that has no package registry. The packages that machine already has
# and that these do not pin are left out (sympy, networkx, mpmath: ~9 MB). On the machine:
#   carry [".s3wheels"]:  mkdir -p /tmp/s3w && cp .s3wheels/* /tmp/s3w/
# and scripts/gpu_bench.sh installs them next to DALI.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .s3wheels && mkdir -p .s3wheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .s3wheels "s3fs" "moto[server]"
rm -f .s3wheels/sympy-* .s3wheels/networkx-* .s3wheels/mpmath-*
echo "wrote .s3wheels: $(ls .s3wheels | wc -l) wheels, $(du -sh .s3wheels | cut -f1)"
