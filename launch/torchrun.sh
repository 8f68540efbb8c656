#!/usr/bin/env bash
# Train with torchrun on one node or many: every node runs
#   bash launch/torchrun.sh --config configs/X.yaml [--set a.b=v ...]
# Variables (environment first, then SLURM's when inside a job, then one local node):
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (default: the GPUs here, else 1), PYTHON,
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT (grace after a signal, default 120 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n ${SLURM_JOB_NODELIST:-} && -z ${MASTER_ADDR:-} ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
MASTER_PORT_SET=${MASTER_PORT:-}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(( gpus > 0 ? gpus : 1 ))}}
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# After SIGTERM/SIGINT torchrun waits this long for its workers to finish their step before SIGKILL (30 s
# by default): a long step at a long sequence needs more.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
if (( NNODES == 1 )) && [[ -z ${MASTER_PORT_SET:-} ]]; then
  where=(--standalone)  # one node: torchrun picks a free local port
else
  where=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
exec "$PYTHON" -m torch.distributed.run "${where[@]}" --nproc-per-node "$NPROC_PER_NODE" -m lasp.train "$@"
