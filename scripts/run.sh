#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the LASP-2 demonstration (extra args are passed on).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec "$PY" -m lasp.demo "$@"
