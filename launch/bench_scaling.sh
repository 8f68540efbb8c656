#!/usr/bin/env bash
# The scaling sweep on a cluster: every node runs
#   bash launch/bench_scaling.sh [--world-sizes 8 16 32 64] [--seq-lens 65536 262144] [--out results/sp] ...
# (arguments go to `python -m lasp.bench.sp sweep`). Node 0 then runs the cost model on what was measured,
# with the interconnect preset LINK (default fit: alpha-beta fitted to the sweep's own calibration).
# Variables as launch/torchrun.sh: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, PYTHON;
# and LINK (fit | nvlink4-h100 | ib-ndr400 | a100-nvswitch-600).
# The model needs simulated compute: run `python -m lasp.bench.sp simulate` with the same arguments on one
# GPU first (it writes simulated.jsonl into the same --out); without it only the sweep runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n ${SLURM_JOB_NODELIST:-} && -z ${MASTER_ADDR:-} ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(( gpus > 0 ? gpus : 1 ))}}
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
LINK=${LINK:-fit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
  --master-port "$MASTER_PORT" --nproc-per-node "$NPROC_PER_NODE" -m lasp.bench.sp sweep "$@"
out=results/sp
args=("$@")
for i in "${!args[@]}"; do [[ ${args[$i]} == --out ]] && out=${args[$((i + 1))]}; done
if (( NODE_RANK == 0 )) && [[ -f $out/simulated.jsonl ]]; then
  exec "$PYTHON" -m lasp.bench.sp model --out "$out" --link "$LINK"
fi
