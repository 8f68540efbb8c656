#!/usr/bin/env bash
# Builds the CPU image with a real container engine and runs it:
#   build       the image (docker/Dockerfile.cpu) on the registry's base, or on a stand-in Debian 12 base
#               made with debootstrap where that cannot be pulled (said plainly);
#   tests       the inner test tier (-m "not slow") inside it, as the image's non-root user;
#   quickstart  a 20-step quick start inside it (scripts/run.sh);
#   nodes       two containers on the host network as two nodes (launch/torchrun.sh, one process each,
#               SP = 2 across them) against the same run in one container: the same per-step losses;
#   kill        two such nodes again, one killed mid-run: the other stops with an error, no checkpoint
#               left half-written.
# Prints the image's size and each step's time.
#
#   bash docker/check.sh [--install-engine] [--engine docker|podman] [--steps build,tests,quickstart,nodes,kill]
#                        [--port PORT] [--image NAME]
#
# --install-engine (root): installs podman, runc and debootstrap from Debian's packages and configures them
# (runc as podman's runtime, no default ulimits), saying what it does. The host's pip configuration (indexes,
# wheel folders, CA store, constraints) is lent to the build read-only, so a machine whose pip reaches only a
# local mirror builds too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEPS_ALL="build,tests,quickstart,nodes,kill"
STEPS=$STEPS_ALL ENGINE="" INSTALL=0 PORT="" IMAGE="lasp:cpu-check"
BASE="python:3.11.13-slim-bookworm" STANDIN="localhost/lasp-base:bookworm-standin"
problems=()
usage() { sed -n '13,14p' "$0" | sed 's/^# //' >&2; }
while (( $# )); do
  case $1 in
    --install-engine) INSTALL=1 ;;
    --engine) ENGINE=${2:-}; shift ;;
    --steps) STEPS=${2:-}; shift ;;
    --port) PORT=${2:-}; shift ;;
    --image) IMAGE=${2:-}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) problems+=("unknown argument $1") ;;
  esac
  shift
done
for s in ${STEPS//,/ }; do
  [[ ",$STEPS_ALL," == *",$s,"* ]] || problems+=("--steps: unknown step '$s' (known: $STEPS_ALL)")
done
[[ -z $ENGINE || $ENGINE == docker || $ENGINE == podman ]] || problems+=("--engine must be docker or podman, got '$ENGINE'")
if [[ -n $PORT ]]; then
  if ! [[ $PORT =~ ^[0-9]+$ ]] || (( PORT < 1 || PORT > 65535 )); then
    problems+=("--port must be a number in 1..65535, got '$PORT'")
  elif ! python3 -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$PORT" 2>/dev/null; then
    problems+=("--port $PORT is in use on 127.0.0.1: the two nodes' rendezvous needs a free port (leave --port out for one)")
  fi
fi
if (( INSTALL )) && (( EUID != 0 )); then
  problems+=("--install-engine installs packages with apt-get and needs root (uid $EUID here)")
fi
if (( ${#problems[@]} )); then
  printf 'docker/check.sh: %s\n' "${problems[@]}" >&2
  usage
  exit 2
fi
say() { echo "== $*" >&2; }
TIMES=()
timed() {  # timed NAME CMD...: runs CMD, records its seconds
  local name=$1 t0=$SECONDS
  shift
  "$@"
  TIMES+=("$name $((SECONDS - t0)) s")
  say "$name: $((SECONDS - t0)) s"
}

# --- the engine ---------------------------------------------------------------------------------------
usable() {
  case $1 in
    docker) command -v docker >/dev/null && docker info >/dev/null 2>&1 ;;
    podman) command -v podman >/dev/null && podman info >/dev/null 2>&1 ;;
  esac
}
install_engine() {  # podman, runc and debootstrap when one is missing; podman's configuration either way
  local missing=()
  for tool in podman runc debootstrap; do command -v $tool >/dev/null || missing+=("$tool"); done
  if (( ${#missing[@]} )); then
    say "installing ${missing[*]} from Debian's packages (apt-get)"
    apt-get install -y -q podman runc debootstrap >/dev/null
  fi
  local conf=/etc/containers/containers.conf
  if ! grep -qs '^default_ulimits' "$conf"; then
    say "writing 'default_ulimits = []' under [containers] in $conf (runc cannot raise the default ulimits here)"
    mkdir -p /etc/containers
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i 's/^\[containers\]/[containers]\ndefault_ulimits = []/' "$conf"
    else
      printf '[containers]\ndefault_ulimits = []\n' >> "$conf"
    fi
  fi
}
if [[ -z $ENGINE ]]; then
  for e in docker podman; do usable $e && { ENGINE=$e; break; }; done
fi
if (( INSTALL )) && [[ -z $ENGINE || $ENGINE == podman ]]; then
  install_engine
  ENGINE=podman
fi
if [[ -z $ENGINE ]] || ! usable "$ENGINE"; then
  echo "docker/check.sh: no usable container engine (${ENGINE:-docker with a running daemon, or podman});" \
    "as root, --install-engine installs podman, runc and debootstrap from Debian's packages" >&2
  exit 2
fi
E=("$ENGINE")
BUILD_EXTRA=()
if [[ $ENGINE == podman ]]; then
  # crun, podman's default runtime, fails on hosts with cgroups in hybrid mode; runc works there
  command -v runc >/dev/null && E+=(--runtime runc)
  BUILD_EXTRA+=(--format docker)  # honours the Dockerfile's SHELL (pipefail)
fi
say "engine: ${E[*]} ($("$ENGINE" --version))"

image_size() { "${E[@]}" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}'; }

# --- the base and the build -----------------------------------------------------------------------------
standin_base() {
  if "${E[@]}" image exists "$STANDIN" 2>/dev/null || "${E[@]}" image inspect "$STANDIN" >/dev/null 2>&1; then
    say "stand-in base $STANDIN exists: reused"
    return
  fi
  command -v debootstrap >/dev/null || { echo "docker/check.sh: $BASE cannot be pulled and debootstrap is" \
    "missing to build a stand-in base (--install-engine installs it)" >&2; exit 2; }
  (( EUID == 0 )) || { echo "docker/check.sh: $BASE cannot be pulled, and building a stand-in base with" \
    "debootstrap needs root" >&2; exit 2; }
  local dir
  dir=$(mktemp -d /var/tmp/lasp-base.XXXXXX)
  say "building a stand-in Debian 12 base with debootstrap in $dir (python3.11, venv, headers, g++)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python3-dev,g++,ca-certificates \
    bookworm "$dir" >"$dir.log" 2>&1; then
    echo "docker/check.sh: debootstrap could not build the stand-in base (log: $dir.log):" >&2
    tail -5 "$dir.log" >&2
    exit 1
  fi
  tar -C "$dir" -c . | "${E[@]}" import - "$STANDIN" >/dev/null
  rm -rf "$dir" "$dir.log"
}
pip_config() {  # the host's pip settings (files and environment) as one pip.conf, and the paths they name
  python3 - "$1" <<'EOF'
import re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
vals = {}
for line in out.splitlines():
    m = re.match(r"^(?::env:|global|install)\.([\w-]+)='(.*)'$", line)
    if m:
        vals[m.group(1)] = m.group(2)
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in vals.items()))
paths = set()
for v in vals.values():
    for word in v.split():
        path = word.removeprefix("file://")
        if path.startswith("/"):
            parts = path.split("/")
            paths.add("/".join(parts[:3]) if len(parts) > 2 else path)  # /opt/wheels, /etc/xdg, ...
print("\n".join(sorted(paths)))
EOF
}
build() {
  local base=$BASE
  if ! "${E[@]}" image inspect "$BASE" >/dev/null 2>&1 && ! timeout 120 "${E[@]}" pull -q "$BASE" >/dev/null 2>&1; then
    say "NOTE: $BASE cannot be pulled here: the image is built on a stand-in base, Debian 12 from debootstrap"
    standin_base
    base=$STANDIN
  fi
  local args=(--build-arg "BASE_IMAGE=$base" --build-arg "LASP_GIT_REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
  if [[ $ENGINE == podman ]]; then  # the host's pip configuration, read-only (docker build cannot mount)
    local work
    work=$(mktemp -d)
    local mounts=(-v "$work/pip.conf:/etc/pip.conf:ro")
    while read -r p; do [[ -e $p ]] && mounts+=(-v "$p:$p:ro"); done < <(pip_config "$work/pip.conf")
    [[ -d /etc/ssl/certs ]] && mounts+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
    args+=("${mounts[@]}" --network host)
    local extra
    extra=$(sed -n 's/^extra-index-url = //p' "$work/pip.conf" | cut -d' ' -f1)
    if [[ -n $extra ]] && ! timeout 10 python3 -c 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=8)' 2>/dev/null; then
      say "PyTorch's CPU index is out of reach: torch comes from the host's pip configuration ($extra)"
      args+=(--build-arg "TORCH_INDEX_URL=$extra")
    fi
  fi
  "${E[@]}" build "${BUILD_EXTRA[@]}" "${args[@]}" -f docker/Dockerfile.cpu -t "$IMAGE" .
  say "image $IMAGE on base $base: $(image_size)"
}

# --- inside the image -----------------------------------------------------------------------------------
run() { "${E[@]}" run --rm --network host "$@"; }
tests() { run "$IMAGE" bash scripts/test.sh -q -m "not slow" -p no:cacheprovider; }
quickstart() { run "$IMAGE" bash scripts/run.sh --set train.steps=20 --set train.eval_interval=10 --set logging.progress=false; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
shared_dir() {  # a host folder the image's user (uid 1000) writes, with the quick start's data prepared
  local d
  d=$(mktemp -d /var/tmp/lasp-check.XXXXXX)
  chown 1000:1000 "$d" 2>/dev/null || chmod 777 "$d"
  run -v "$d:/shared" "$IMAGE" bash -c 'python -m lasp.data prepare --input "$(python -c "import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])")/*.py" --output /shared/data --val-fraction 0.05 >/dev/null 2>&1'
  echo "$d"
}
NODE_ARGS=(--config configs/cpu-quickstart.yaml --set data.path=/shared/data --set train.eval_interval=0
  --set logging.progress=false --set logging.tensorboard=false --set logging.plot=false)
node() {  # node DIR RANK PORT NAME [--set ...]: one node of two, detached
  local d=$1 rank=$2 port=$3 name=$4
  shift 4
  "${E[@]}" rm -f "$name" >/dev/null 2>&1 || true
  "${E[@]}" run -d --network host --name "$name" -v "$d:/shared" \
    -e NNODES=2 -e NODE_RANK="$rank" -e NPROC_PER_NODE=1 -e MASTER_ADDR=127.0.0.1 -e MASTER_PORT="$port" \
    -e RDZV_TIMEOUT=120 "$IMAGE" bash launch/torchrun.sh "${NODE_ARGS[@]}" "$@" >/dev/null
}
losses() { python3 -c 'import json, sys; print([json.loads(l)["loss"] for l in open(sys.argv[1]) if "\"loss\"" in l and "eval" not in l])' "$1"; }
nodes() {
  local d port
  d=$(shared_dir)
  port=${PORT:-$(free_port)}
  say "two nodes (one container each) on 127.0.0.1:$port, SP = 2 across them, 10 steps"
  node "$d" 0 "$port" lasp-node0 --set train.steps=10 --set logging.run_dir=/shared/nodes
  node "$d" 1 "$port" lasp-node1 --set train.steps=10 --set logging.run_dir=/shared/nodes
  local s0 s1
  s0=$("${E[@]}" wait lasp-node0) s1=$("${E[@]}" wait lasp-node1)
  if (( s0 != 0 || s1 != 0 )); then
    for n in lasp-node0 lasp-node1; do echo "--- $n:" >&2; "${E[@]}" logs "$n" 2>&1 | tail -15 >&2; done
    echo "docker/check.sh: the two nodes exited with $s0 and $s1" >&2
    exit 1
  fi
  "${E[@]}" logs lasp-node0 2>&1 | grep -E '^(node|step +[0-9]+ \|)' | sed -n '1,3p;$p' >&2
  "${E[@]}" rm lasp-node0 lasp-node1 >/dev/null
  say "the same run in one container, two processes"
  run -v "$d:/shared" -e NPROC_PER_NODE=2 "$IMAGE" bash launch/torchrun.sh "${NODE_ARGS[@]}" \
    --set train.steps=10 --set logging.run_dir=/shared/one >/dev/null
  local a b
  a=$(losses "$d/nodes/metrics.jsonl") b=$(losses "$d/one/metrics.jsonl")
  echo "two containers: $a"
  echo "one container:  $b"
  [[ $a == "$b" ]] || { echo "docker/check.sh: the per-step losses differ" >&2; exit 1; }
  rm -rf "$d"
}
kill_one() {
  local d port
  d=$(shared_dir)
  port=${PORT:-$(free_port)}
  node "$d" 0 "$port" lasp-kill0 --set train.steps=100000 --set checkpoint.interval=2 --set logging.run_dir=/shared/kill
  node "$d" 1 "$port" lasp-kill1 --set train.steps=100000 --set checkpoint.interval=2 --set logging.run_dir=/shared/kill
  local waited=0
  until [[ -s $d/kill/metrics.jsonl ]] && (( $(grep -c '"loss"' "$d/kill/metrics.jsonl") >= 4 )); do
    sleep 1; (( ++waited < 300 )) || { echo "docker/check.sh: the nodes did not train within 300 s" >&2; exit 1; }
  done
  say "killing node 1 (its container) mid-run"
  local t0=$SECONDS
  "${E[@]}" kill lasp-kill1 >/dev/null
  local s0
  s0=$("${E[@]}" wait lasp-kill0)
  say "node 0 stopped $((SECONDS - t0)) s later with status $s0; its last lines:"
  "${E[@]}" logs lasp-kill0 2>&1 | tail -4 >&2
  "${E[@]}" rm -f lasp-kill0 lasp-kill1 >/dev/null
  [[ $s0 != 0 ]] || { echo "docker/check.sh: node 0 finished as if nothing happened" >&2; exit 1; }
  local bad
  bad=$(find "$d/kill/checkpoints" -maxdepth 1 -name 'step-*' ! -name '*.tmp' -type d \
    -exec sh -c '[ -f "$1/COMMITTED" ] || echo "$1"' _ {} \; 2>/dev/null)
  [[ -z $bad ]] || { echo "docker/check.sh: checkpoints without COMMITTED: $bad" >&2; exit 1; }
  echo "committed checkpoints left whole: $(cd "$d/kill/checkpoints" && ls -d step-* | tr '\n' ' ')"
  rm -rf "$d"
}

for s in ${STEPS//,/ }; do
  case $s in
    build) timed build build ;;
    tests) timed tests tests ;;
    quickstart) timed quickstart quickstart ;;
    nodes) timed nodes nodes ;;
    kill) timed kill kill_one ;;
  esac
done
echo "image $IMAGE: $(image_size)"
printf 'step %s\n' "${TIMES[@]}"
