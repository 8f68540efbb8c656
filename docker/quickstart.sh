#!/usr/bin/env bash
# The GPU image's default command: the README's main job (scripts/run.sh prepares data/stdlib, then trains
# configs/cpu-quickstart.yaml through launch/torchrun.sh) with one process per visible GPU. The sequence is
# split over every rank of every node (NNODES, as launch/torchrun.sh reads it), which the config's
# zigzag layout allows for 1, 2, 4, 8, 16 ... ranks (512 tokens in 2 x ranks chunks). Extra arguments
# go to python -m lasp.train after that, so they win (e.g. --set train.steps=50).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if (( gpus == 0 )); then
  echo "error: no GPU visible here (docker run --gpus all ...); the CPU image is docker/Dockerfile.cpu" >&2
  exit 1
fi
export NPROC_PER_NODE=${NPROC_PER_NODE:-$gpus}
exec bash scripts/run.sh --set "parallel.sp=$(( ${NNODES:-1} * NPROC_PER_NODE ))" "$@"
