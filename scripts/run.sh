#!/usr/bin/env bash
# The main job: sets up .venv if needed, prepares data/stdlib (this Python's standard-library sources,
# byte tokenizer) once, then trains the quick-start hybrid model with SP=2 on 2 CPU processes through
# torchrun. Extra arguments go to python -m lasp.train (e.g. --set train.steps=50).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
if [[ ! -f data/stdlib/meta.json ]]; then
  stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  "$PY" -m lasp.data prepare --input "$stdlib/*.py" --output data/stdlib --val-fraction 0.05
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-2} PYTHON="$PY" exec bash launch/torchrun.sh --config configs/cpu-quickstart.yaml "$@"
