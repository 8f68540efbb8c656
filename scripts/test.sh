#!/usr/bin/env bash
# The test suite: sets up .venv if needed, runs the linter (ruff: lint, import order, format check; about a
# second), then pytest (extra args are passed on).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
"$PY" -m ruff check --quiet .
"$PY" -m ruff format --check --quiet .
exec "$PY" -m pytest "$@"
