#!/usr/bin/env bash
# What a lent GPU machine runs, in one call (docs/gpu.md):
#   bash scripts/gpu_session.sh [--dry] tests|bench|train|all [arguments for python -m lasp.bench.kernels]
# tests: the GPU-only tests (Triton kernels, the side stream, the fla backend against the torch path).
# bench: python -m lasp.bench.kernels at B = 1, H = 16, K = V = 128, bf16, T = 8K, 32K, 128K (lasp's Triton
#        kernels and flash-linear-attention's, forward + backward), unless arguments say otherwise.
# train: the trainer on one GPU, 20 steps each: the 1B linear config at 32K tokens; the Gated DeltaNet 3:1
#        hybrid at 8K, 16K and 32K; then the 1B config with full activation checkpointing from 64K, doubling
#        while it trains, up to 512K (the longest that does is the figure). Byte-tokenised data of the machine's own
#        Python library (vocab 320 instead of the configs' 128K and 152K: no tokenizer travels).
# Each step runs under its own time limit (STEP_TIMEOUT_S, LONG_TIMEOUT_S) and writes its log and JSONL under
# $OUT (the device tool's folder that comes back) or results/gpu; one step failing does not stop the others,
# and the exit status says whether any failed. The whole of `all` is sized for 8 minutes on one H100/H200.
# --dry: the rehearsal on a machine without a GPU: prints every command, checks each training config with
# the trainer's --dry-run and the benchmark's arguments, runs nothing on a GPU.
# Wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh: fla-core, megatron-core) go to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=""
if [[ ${1:-} == --dry ]]; then dry=1; shift; fi
mode=${1:-all}
shift || true
case $mode in tests|bench|train|all) ;; *) echo "usage: $0 [--dry] tests|bench|train|all [bench args]" >&2; exit 2 ;; esac
out=${OUT:-results/gpu}
step_timeout=${STEP_TIMEOUT_S:-40}
long_timeout=${LONG_TIMEOUT_S:-30}
py=${PYTHON:-python3}
mkdir -p "$out" || exit 2
if [[ -z $dry ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
rc=0
step() { # step NAME TIMEOUT COMMAND...: run it bounded, log to $out/NAME.log, note its status in steps.jsonl
  local name=$1 limit=$2 start status
  shift 2
  echo "== $name (at most ${limit} s): $*" | tee -a "$out/session.log"
  if [[ -n $dry ]]; then return 0; fi
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  printf '{"step": "%s", "status": %d, "seconds": %d, "timed_out": %s}\n' "$name" "$status" \
    "$(( $(date +%s) - start ))" "$([[ $status == 124 || $status == 137 ]] && echo true || echo false)" >> "$out/steps.jsonl"
  tail -3 "$out/$name.log" | sed 's/^/   /'
  return $status
}
if [[ -z $dry ]]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  } 2>&1 | tee "$out/machine.txt"
fi
if [[ $mode == tests || $mode == all ]]; then
  step gpu_tests 80 "$py" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_gpu_stream.py \
    tests/test_fla_kernel.py || rc=1
fi
if [[ $mode == bench || $mode == all ]]; then
  args=("$@")
  [[ ${#args[@]} -gt 0 ]] || args=(--batch 1 --lengths 8192 32768 131072 --heads 16 --head-dim 128)
  if [[ -n $dry ]]; then
    "$py" -m lasp.bench.kernels --help > /dev/null || rc=1 # the module imports; its arguments parse below
  fi
  step bench 120 "$py" -m lasp.bench.kernels --out "$out/kernels" "${args[@]}" || rc=1
fi
if [[ $mode == train || $mode == all ]]; then
  data=${DATA:-data/stdlib}
  if [[ ! -f $data/meta.json ]]; then
    stdlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    echo "== preparing $data from $stdlib (byte tokenizer)"
    "$py" -m lasp.data prepare --input "$stdlib/*.py" --output "$data" --val-fraction 0.01 > "$out/data.log" 2>&1 || rc=1
  fi
  common=(--set "data.path=$data" --set model.vocab_size=320 --set train.steps=20 --set train.eval_interval=0
    --set checkpoint.interval=0 --set checkpoint.save_on_exit=false --set logging.tensorboard=false
    --set logging.plot=false --set logging.progress=false --set train.device=cuda)
  runs=(
    "1b-linear-32k configs/linear-llama3-1b.yaml 32768 2"
    "gdn-hybrid-8k configs/qwen3-next-shaped-1b-gdn-sp8.yaml 8192 full"
    "gdn-hybrid-16k configs/qwen3-next-shaped-1b-gdn-sp8.yaml 16384 full"
    "gdn-hybrid-32k configs/qwen3-next-shaped-1b-gdn-sp8.yaml 32768 full"
  )
  for run in "${runs[@]}"; do
    read -r name config seq ac <<< "$run"
    cmd=("$py" -m lasp.train --config "$config" "${common[@]}" --set "data.seq_len=$seq" --set parallel.sp=1
      --set "train.activation_checkpointing=$ac" --set train.kernel=auto --set "logging.run_dir=$out/train/$name")
    if [[ -n $dry ]]; then "${cmd[@]}" --set train.device=auto --dry-run > /dev/null || { echo "   $name: the dry run failed"; rc=1; }; fi
    step "train-$name" "$step_timeout" "${cmd[@]}" || rc=1
  done
  seq=65536 # the longest sequence the 1B model trains at, with every layer checkpointed
  while [[ $seq -le 524288 ]]; do
    cmd=("$py" -m lasp.train --config configs/linear-llama3-1b.yaml "${common[@]}" --set "data.seq_len=$seq"
      --set train.steps=3 --set train.activation_checkpointing=full --set "logging.run_dir=$out/train/1b-longest-$seq")
    if [[ -n $dry ]]; then "${cmd[@]}" --set train.device=auto --dry-run > /dev/null || { echo "   longest $seq: the dry run failed"; rc=1; }; fi
    step "train-1b-longest-$seq" "$long_timeout" "${cmd[@]}" || break
    [[ -z $dry ]] || break # one rehearsal of the loop is enough
    seq=$(( seq * 2 ))
  done
fi
echo "== done (status $rc); results in $out"
exit $rc
