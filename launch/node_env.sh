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
