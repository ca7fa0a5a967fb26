#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole suite (arguments go to pytest).
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m pytest "$@"
