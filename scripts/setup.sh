#!/usr/bin/env bash
# Sourced by run.sh and test.sh: creates .venv in the repo root when it is missing and installs the
# pinned dependencies (again only when the pins, pyproject.toml or this script change). CPU pins unless a
# GPU answers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PINS="$ROOT/requirements/constraints-gpu.txt"
  DS_ENV=(DS_BUILD_OPS=0)
else
  PINS="$ROOT/requirements/constraints-cpu.txt"
  DS_ENV=(DS_BUILD_OPS=0 DS_ACCELERATOR=cpu)
fi
if [ ! -x "$PY" ]; then
  BASE_PY="$(command -v python3.11 || command -v python3)"
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "LASP needs Python >= 3.11" >&2; exit 1; }
  echo "creating $VENV" >&2
  "$BASE_PY" -m venv "$VENV"
fi
STAMP="$VENV/.lasp-installed"
WANT="$(cat "$PINS" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "installing pinned dependencies from ${PINS#"$ROOT"/}" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$PINS" setuptools
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$PINS" -e "$ROOT[test,bench]"
  # DeepSpeed (ZeRO) builds no ops at install time and must see the installed torch: no build isolation.
  env "${DS_ENV[@]}" "$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation -c "$PINS" deepspeed
  if [ "$PINS" = "$ROOT/requirements/constraints-cpu.txt" ]; then
    # DeepSpeed's CPU accelerator compiles its shared-memory comm op (g++, about 25 s) at the first ZeRO
    # start; build it now, into torch's extension cache, so no training run or test pays for it.
    echo "building DeepSpeed's CPU comm op" >&2
    env "${DS_ENV[@]}" "$PY" -c 'from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)' >/dev/null
  fi
  echo "$WANT" > "$STAMP"
fi
