#!/usr/bin/env bash
# Train under the deepspeed launcher:
#   bash launch/deepspeed.sh --config configs/X.yaml [--set a.b=v ...]
# Variables: HOSTFILE (one "host slots=N" line per node, see launch/hostfile.example; unset: this node
# only), NPROC_PER_NODE (without a hostfile; default: the GPUs here, else 1), MASTER_PORT, PYTHON.
# The launcher reaches the other hosts of a hostfile over ssh (pdsh or openmpi per its --launcher);
# NO_SSH=1 instead runs this script on every node yourself, with NODE_RANK and MASTER_ADDR (the first
# host of the hostfile), as with torchrun.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source launch/node_env.sh  # for check_launch_vars; this launcher's own defaults above stay
check_launch_vars NPROC_PER_NODE MASTER_PORT
if (( gpus == 0 )); then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || { echo "error: HOSTFILE $HOSTFILE does not exist or is not a file" >&2; exit 2; }
  world=$(awk '!/^[[:space:]]*#/ { for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n += a[2] } }
               END { print n + 0 }' "$HOSTFILE")
else
  world=$NPROC_PER_NODE
fi
check_config "$world" "$@"
if [[ -n ${HOSTFILE:-} && ${NO_SSH:-0} == 1 ]]; then
  where=(--hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}")
elif [[ -n ${HOSTFILE:-} ]]; then
  where=(--hostfile "$HOSTFILE")
else
  where=(--num_gpus "$NPROC_PER_NODE")
fi
exec "$PYTHON" -m lasp.train.launcher deepspeed "${where[@]}" --master_port "$MASTER_PORT" --module lasp.train "$@"
