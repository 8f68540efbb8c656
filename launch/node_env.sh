# Sourced by the launch scripts: where this node stands in the job, from the environment first, then
# SLURM's when inside a job, then one local node. Sets NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# NPROC_PER_NODE (default: the GPUs here, else 1), PYTHON; MASTER_PORT_SET says whether a port was given.
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
# Check the variables before anything starts: every problem at once, exit 2 (a usage error).
check_launch_vars() {  # names of variables that must be whole numbers >= 1 (NODE_RANK, MAX_RESTARTS: >= 0)
  local bad=("${LAUNCH_PROBLEMS[@]+"${LAUNCH_PROBLEMS[@]}"}") v  # problems the script found itself
  for v in "$@"; do
    if [[ ! ${!v} =~ ^[0-9]+$ ]]; then
      bad+=("$v must be a whole number, got '${!v}'")
    elif [[ $v != NODE_RANK && $v != MAX_RESTARTS ]] && (( 10#${!v} < 1 )); then
      bad+=("$v must be at least 1, got ${!v}")
    fi
  done
  if [[ " $* " == *" NODE_RANK "* && " $* " == *" NNODES "* && ${NODE_RANK} =~ ^[0-9]+$ && ${NNODES} =~ ^[0-9]+$ ]] \
    && (( 10#$NODE_RANK >= 10#$NNODES )); then
    bad+=("NODE_RANK must be below NNODES: NODE_RANK=$NODE_RANK, NNODES=$NNODES (ranks count from 0)")
  fi
  if [[ " $* " == *" MASTER_PORT "* && ${MASTER_PORT} =~ ^[0-9]+$ ]] && (( 10#$MASTER_PORT > 65535 )); then
    bad+=("MASTER_PORT must be at most 65535, got $MASTER_PORT")
  fi
  if (( ${#bad[@]} )); then
    printf 'error: %s\n' "${bad[@]}" >&2
    exit 2
  fi
}
# The trainer's config check against the world size about to start, before any process is spawned (exit 2
# with the trainer's message); skipped for --help and --dry-run, which start nothing anyway.
check_config() {  # world_size, then the trainer's arguments
  local world=$1
  shift
  if [[ " $* " != *" --help "* && " $* " != *" -h "* && " $* " != *" --dry-run "* ]]; then
    "$PYTHON" -m lasp.train --check-only --world-size "$world" "$@" || exit $?
  fi
}
