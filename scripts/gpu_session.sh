#!/usr/bin/env bash
# What a lent GPU machine runs for the kernel work, in one call (README: "GPU session"):
#   bash scripts/gpu_session.sh tests|bench|all [arguments for python -m lasp.bench.kernels]
# It uses the machine's own python3 (PyTorch, Triton, pytest, matplotlib); wheels carried in .whl/
# (scripts/fetch_gpu_wheels.sh) go to /tmp/site first. Logs and results go to $OUT (the device tool's
# folder that comes back) or results/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
shift || true
case $mode in tests|bench|all) ;; *) echo "usage: $0 tests|bench|all [bench args]" >&2; exit 2 ;; esac
out=${OUT:-results/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/machine.txt"
rc=0
if [[ $mode != bench ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_gpu_stream.py 2>&1 \
    | tee "$out/gpu_tests.log" || rc=1
fi
if [[ $mode != tests ]]; then
  python3 -m lasp.bench.kernels --out "$out/kernels" "$@" 2>&1 | tee "$out/bench.log" || rc=1
fi
exit $rc
