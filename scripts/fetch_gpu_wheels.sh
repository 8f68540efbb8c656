#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels a lent GPU machine lacks: it has PyTorch, Triton,
# pytest, matplotlib and einops but no network. Here: bash scripts/fetch_gpu_wheels.sh; there: the
# device tool carries .whl and scripts/gpu_session.sh installs it (README: "GPU session").
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[[ -x $py ]] || py=python3
# flash-linear-attention's kernels, the benchmark's peer: pure Python + Triton, needs only einops.
$py -m pip download -q --no-deps --only-binary=:all: -d .whl fla-core==0.6.0
ls -l .whl
