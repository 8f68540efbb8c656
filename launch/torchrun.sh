#!/usr/bin/env bash
# Train with torchrun on one node or many: every node runs
#   bash launch/torchrun.sh --config configs/X.yaml [--set a.b=v ...]
# Variables (environment first, then SLURM's when inside a job, then one local node):
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (default: the GPUs here, else 1), PYTHON,
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT (grace after a signal, default 120 s), RDZV_TIMEOUT (how long the nodes
#   wait for each other, default 600 s).
# Elastic (docs/checkpoints.md, "Elastic restarts"): NNODES=MIN:MAX starts torchrun with the c10d rendezvous
# at MASTER_ADDR:MASTER_PORT (its store is hosted by the node at MASTER_ADDR, which must live; on one
# machine, where every node matches, name it with RDZV_CONF=is_host=1 and is_host=0 on the others;
# NODE_RANK is not used: the rendezvous numbers the nodes). The job starts with the nodes that arrive within RDZV_LAST_CALL seconds
# (default 30) once MIN are there, up to MAX; when a node dies the others restart their workers on the
# nodes that remain (at most MAX_RESTARTS times, default 3), and a node that joins later makes them restart
# onto the larger world (not counted). Each restart resumes from the newest checkpoint; the config must fit
# every world from MIN to MAX nodes (parallel.dp: auto, parallel.sp as a list of allowed degrees), checked
# here before anything starts. RDZV_ID names the job (default: SLURM's job id, else lasp); RDZV_CONF adds
# key=value pairs to torchrun's --rdzv-conf (e.g. keep_alive_interval=2,keep_alive_max_attempt=3: how soon
# a dead node is given up on, 15 s by default).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/node_env.sh
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
if [[ $NNODES == *:* ]]; then
  RDZV_LAST_CALL=${RDZV_LAST_CALL:-30} MAX_RESTARTS=${MAX_RESTARTS:-3} RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-lasp}}
  if [[ $NNODES =~ ^0*([1-9][0-9]*):0*([1-9][0-9]*)$ ]]; then
    MIN_NODES=${BASH_REMATCH[1]} MAX_NODES=${BASH_REMATCH[2]}
    if (( MIN_NODES > MAX_NODES )); then
      LAUNCH_PROBLEMS=("NNODES=$NNODES: the smallest number of nodes ($MIN_NODES) is above the largest ($MAX_NODES)")
    fi
  else
    LAUNCH_PROBLEMS=("NNODES must be a number of nodes or a range MIN:MAX of them (each at least 1), got '$NNODES'")
  fi
  check_launch_vars NPROC_PER_NODE MASTER_PORT RDZV_TIMEOUT RDZV_LAST_CALL MAX_RESTARTS
  worlds=$(seq -s, $(( MIN_NODES * NPROC_PER_NODE )) "$NPROC_PER_NODE" $(( MAX_NODES * NPROC_PER_NODE )))
  check_config "$worlds" "$@"
  # a fresh store for the workers at every restart (the rendezvous' own store outlives the rounds)
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
else
  check_launch_vars NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT RDZV_TIMEOUT
  check_config $(( NNODES * NPROC_PER_NODE )) "$@"
fi
# After SIGTERM/SIGINT torchrun waits this long for its workers to finish their step before SIGKILL (30 s
# by default): a long step at a long sequence needs more.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
if [[ -n ${MIN_NODES:-} ]]; then
  where=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
         --max-restarts "$MAX_RESTARTS"
         --rdzv-conf "join_timeout=$RDZV_TIMEOUT,last_call_timeout=$RDZV_LAST_CALL${RDZV_CONF:+,$RDZV_CONF}")
  echo "elastic: $MIN_NODES to $MAX_NODES nodes of $NPROC_PER_NODE process(es), joining the rendezvous $RDZV_ID at" \
    "$MASTER_ADDR:$MASTER_PORT (up to $MAX_RESTARTS restarts after a failure)" >&2
elif (( NNODES == 1 )) && [[ -z ${MASTER_PORT_SET:-} ]]; then
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
