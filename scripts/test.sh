#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (extra args are passed on).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
