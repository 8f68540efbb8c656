#!/usr/bin/env bash
# Train with torchrun on one node or many: every node runs
#   bash launch/torchrun.sh --config configs/X.yaml [--set a.b=v ...]
# Variables (environment first, then SLURM's when inside a job, then one local node):
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (default: the GPUs here, else 1), PYTHON,
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT (grace after a signal, default 120 s), RDZV_TIMEOUT (how long the nodes
#   wait for each other, default 600 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/node_env.sh
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
check_launch_vars NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT RDZV_TIMEOUT
check_config $(( NNODES * NPROC_PER_NODE )) "$@"
# After SIGTERM/SIGINT torchrun waits this long for its workers to finish their step before SIGKILL (30 s
# by default): a long step at a long sequence needs more.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
if (( NNODES == 1 )) && [[ -z ${MASTER_PORT_SET:-} ]]; then
  where=(--standalone)  # one node: torchrun picks a free local port
else
  where=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         --rdzv-conf "timeout=$RDZV_TIMEOUT")
  if (( NNODES > 1 )); then
    echo "node $NODE_RANK of $NNODES ($NPROC_PER_NODE process(es) here): waiting for all $NNODES nodes at" \
      "$MASTER_ADDR:$MASTER_PORT (rendezvous timeout ${RDZV_TIMEOUT} s, RDZV_TIMEOUT)" >&2
  fi
fi
exec "$PYTHON" -m lasp.train.launcher torchrun "${where[@]}" --nproc-per-node "$NPROC_PER_NODE" -m lasp.train "$@"
