#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels of requirements/gpu-peers.txt: a lent GPU machine
# has PyTorch, Triton, pytest, matplotlib and einops (Python 3.12) but no network. Here: bash scripts/fetch_gpu_wheels.sh; there: the
# device tool carries .whl and scripts/gpu_session.sh installs it (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[[ -x $py ]] || py=python3
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl -r requirements/gpu-peers.txt
ls -l .whl
