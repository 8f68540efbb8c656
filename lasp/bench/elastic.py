"""Elastic restarts, timed on one machine: how long from a node's death to the first step on the nodes that
remain, and from a new node's start to the first step on the larger world (docs/checkpoints.md,
"Elastic restarts").

    python -m lasp.bench.elastic [--data data/stdlib] [--last-call 30] [--rdzv-conf ...] [--out results/elastic]

Two `launch/torchrun.sh` agents of --nproc processes each (NNODES=1:2, c10d rendezvous on loopback, node a
hosting it) train a tiny model at sp 2 x dp auto with `micro_batch_size: 1` and a checkpoint every
--interval steps. At step --kill-at node b (its agent and workers) is killed with SIGKILL; once node a trains
alone, node c starts and the job grows back. Then both are stopped with SIGTERM (they save and exit 75).
Appends one row to <out>.jsonl: the settings, the steps (killed at, resumed from, grown at) and the two
times, with the environment.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lasp.bench.common import environment
from lasp.cli import at_least, existing, usage_error, writable
from lasp.train.distributed import port_problem
from lasp.train.metrics import read_rows

ROOT = Path(__file__).resolve().parents[2]
MODEL = {
    "vocab_size": 258,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "ffn_hidden_size": 64,
    "layer_pattern": "LS",
}


def _config(a: argparse.Namespace, run_dir: str) -> dict:
    return {
        "model": MODEL,
        "data": {"path": os.path.abspath(a.data), "seq_len": 64, "global_batch": 4},
        "optim": {"lr": 1e-3},
        "train": {"steps": 100000, "eval_interval": 0},
        "parallel": {"sp": 2, "dp": "auto", "micro_batch_size": 1},
        "checkpoint": {"interval": a.interval, "keep_last": 2},
        "logging": {"progress": False, "run_dir": run_dir, "tensorboard": False, "plot": False},
    }


def _rows(run_dir: str, kind: str) -> list[dict]:
    return [r for r in read_rows(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == kind]


def _until(what: str, found, nodes: dict, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = found()
        if got:
            return got
        ended = [name for name, p in nodes.items() if p.poll() is not None]
        if ended:
            raise RuntimeError(f"node {ended[0]} ended (status {nodes[ended[0]].returncode}) before {what}")
        time.sleep(0.05)
    raise RuntimeError(f"no {what} after {timeout:.0f} s")


def measure(a: argparse.Namespace, work: str) -> dict:
    """One kill and one growth (see the module's docstring) -> the row."""
    run_dir, config = os.path.join(work, "run"), os.path.join(work, "config.yaml")
    Path(config).write_text(yaml.safe_dump(_config(a, run_dir)))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
        "PYTHON": sys.executable,
        "NNODES": "1:2",
        "NPROC_PER_NODE": str(a.nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(a.port),
        "RDZV_LAST_CALL": str(a.last_call),
        "OMP_NUM_THREADS": "1",
    }
    nodes: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        conf = ",".join([f"is_host={int(name == 'a')}"] + ([a.rdzv_conf] if a.rdzv_conf else []))
        with open(os.path.join(work, f"node-{name}.log"), "w") as log:
            nodes[name] = subprocess.Popen(
                ["bash", "launch/torchrun.sh", "--config", config],
                cwd=ROOT,
                env={**env, "RDZV_CONF": conf},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        print(f"node {name} started", flush=True)

    try:
        start("a")
        start("b")
        full = 2 * a.nproc  # a node that came late joins at a restart: wait for the world of both
        _until("both nodes", lambda: [r for r in _rows(run_dir, "layout") if r["world_size"] == full], nodes)
        _until(f"step {a.kill_at}", lambda: [r for r in _rows(run_dir, "train") if r["step"] >= a.kill_at], nodes)
        starts = len(_rows(run_dir, "layout"))
        workers = subprocess.run(["pgrep", "-P", str(nodes["b"].pid)], capture_output=True, text=True).stdout
        killed_at = _rows(run_dir, "train")[-1]["step"]
        for pid in [nodes["b"].pid, *map(int, workers.split())]:
            os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        nodes.pop("b").wait()
        print(f"node b killed at step {killed_at}", flush=True)
        shrink = _until("the restart without node b", lambda: _rows(run_dir, "layout")[starts:], nodes)[0]
        _until(
            "a step after the shrink", lambda: [r for r in _rows(run_dir, "train") if r["step"] > shrink["step"]], nodes
        )
        shrink_s = time.monotonic() - t_kill
        print(f"{shrink['world_size']} ranks from step {shrink['step']}: {shrink_s:.1f} s after the kill", flush=True)
        time.sleep(a.join_after)
        start("c")
        t_join = time.monotonic()
        grow = _until("the restart with node c", lambda: _rows(run_dir, "layout")[starts + 1 :], nodes)[0]
        _until(
            "a step after the growth", lambda: [r for r in _rows(run_dir, "train") if r["step"] > grow["step"]], nodes
        )
        grow_s = time.monotonic() - t_join
        print(f"{grow['world_size']} ranks from step {grow['step']}: {grow_s:.1f} s after node c started", flush=True)
    finally:
        for p in nodes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in nodes.values():
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    return {
        "nproc_per_node": a.nproc,
        "last_call_s": a.last_call,
        "rdzv_conf": a.rdzv_conf,
        "interval": a.interval,
        "killed_at_step": killed_at,
        "shrunk_to": shrink["world_size"],
        "resumed_from_step": shrink["step"],
        "kill_to_first_step_s": round(shrink_s, 2),
        "grew_to": grow["world_size"],
        "grown_at_step": grow["step"],
        "join_to_first_step_s": round(grow_s, 2),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.elastic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default="data/stdlib", help="a prepared byte-level dataset (scripts/run.sh makes this one)"
    )
    p.add_argument("--nproc", type=int, default=2, help="processes per node (sp 2 x dp auto)")
    p.add_argument("--last-call", type=int, default=30, help="RDZV_LAST_CALL, seconds (torch's default: 30)")
    p.add_argument("--rdzv-conf", default="", help="RDZV_CONF, e.g. keep_alive_interval=1,keep_alive_max_attempt=3")
    p.add_argument("--interval", type=int, default=20, help="checkpoint.interval")
    p.add_argument("--kill-at", type=int, default=30, help="kill node b once this step is done")
    p.add_argument("--join-after", type=float, default=3.0, help="seconds between the shrink and node c's start")
    p.add_argument("--port", type=int, help="the rendezvous port on 127.0.0.1 (default: a free one)")
    p.add_argument("--out", type=Path, default=Path("results/elastic"), help="appends a row to <out>.jsonl")
    a = p.parse_args(argv)
    problems = existing("--data", a.data, directory=True)
    problems += [
        q
        for opt in ("nproc", "last_call", "interval", "kill_at")
        for q in at_least(f"--{opt.replace('_', '-')}", getattr(a, opt))
    ]
    if a.nproc % 2:
        problems.append(f"--nproc must be even (sp 2 on each node), got {a.nproc}")
    problems += writable("--out", a.out.with_suffix(".jsonl"))
    if a.port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            a.port = sock.getsockname()[1]
    problems += [q for q in [port_problem("127.0.0.1", a.port, "--port")] if q]
    usage_error(p, problems)
    with tempfile.TemporaryDirectory(prefix="lasp-bench-elastic-") as work:
        row = {**measure(a, work), **environment()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.with_suffix(".jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
