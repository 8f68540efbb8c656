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
source launch/node_env.sh
check_launch_vars NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT
LINK=${LINK:-fit}
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
  --master-port "$MASTER_PORT" --nproc-per-node "$NPROC_PER_NODE" -m lasp.bench.sp sweep "$@"
out=results/sp
args=("$@")
for i in "${!args[@]}"; do [[ ${args[$i]} == --out ]] && out=${args[$((i + 1))]}; done
if (( NODE_RANK == 0 )) && [[ -f $out/simulated.jsonl ]]; then
  exec "$PYTHON" -m lasp.bench.sp model --out "$out" --link "$LINK"
fi
