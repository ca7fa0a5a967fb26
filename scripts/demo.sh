#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the main job on the embedded default
# (python -m infra.demo): digits -> shards -> teacher -> teacher cache -> plain and distilled DeiT students
# through Ray Train (2 workers; CPU when there is no GPU) -> MLflow. Arguments go to infra.demo
# (e.g. --quick, --out DIR, --shards-url s3://bucket/prefix).
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m infra.demo "$@"
