"""The trainer end to end: python -m lasp.train as one process and under torchrun (CPU, gloo)."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_launch import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "model": {
        "vocab_size": 258,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "ffn_hidden_size": 64,
        "layer_pattern": "LS",
    },
    "data": {"seq_len": 64, "global_batch": 4},
    "optim": {"lr": 1e-2},
    "schedule": {"warmup_steps": 2},
    "train": {"steps": 6, "eval_interval": 3, "eval_batches": 1},
    "logging": {"progress": False},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lasp.data import prepare

    out = tmp_path_factory.mktemp("corpus") / "data"
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:12]
    prepare(files, str(out), val_fraction=0.2, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """Per-step (loss, grad norm) of the tiny config trained by one process (this one: the entry point's own
    run is test_one_process_trains_...)."""
    from tests.test_checkpoint import run

    tmp = tmp_path_factory.mktemp("reference")
    config, run_dir = _config(tmp, corpus, "one")
    run(yaml.safe_load(open(config)))
    return [(r["loss"], r["grad_norm"]) for r in _rows(run_dir)]


def _same_curve(run_dir, reference, steps=None):
    got = [(r["loss"], r["grad_norm"]) for r in _rows(run_dir)]
    want = reference[: steps or len(reference)]
    assert len(got) == len(want)
    for (loss, norm), (loss_1, norm_1) in zip(got, want):
        assert abs(loss - loss_1) <= 1e-5 * abs(loss_1) and abs(norm - norm_1) <= 1e-4 * abs(norm_1), (got, want)


def _config(tmp_path, corpus, name="c", **sections):
    cfg = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    cfg["data"]["path"] = corpus
    cfg["logging"]["run_dir"] = str(tmp_path / f"run-{name}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg["logging"]["run_dir"]


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(config, nproc=1, extra=(), check=True, timeout=300):
    launcher = (
        [sys.executable, "-m", "lasp.train.launcher", "torchrun", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    out = subprocess.run(
        [*launcher, "-m", "lasp.train", "--config", config, *extra],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def _rows(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _rows_now(run_dir, kind="train"):
    """The rows of a run still writing (a half-written line is left out)."""
    from lasp.train.metrics import read_rows

    return [r for r in read_rows(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == kind]


@pytest.mark.slow
def test_one_process_trains_and_leaves_metrics_tensorboard_and_plot(tmp_path, corpus):
    config, run_dir = _config(tmp_path, corpus, train={"steps": 8})
    out = _train(config)
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for col in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gib"):
        assert col in rows[0]
    assert rows[0]["mfu"] is None and rows[-1]["tokens"] == 8 * 4 * 64
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [r["step"] for r in _rows(run_dir, "eval")] == [3, 6, 8]
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 1000
    assert f"run directory: {run_dir}" in out.stdout and "(first step) ->" in out.stdout
    assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["train"]["steps"] == 8


@pytest.mark.slow
def test_the_cpu_gated_deltanet_config_trains_at_sp2_with_a_falling_loss(tmp_path, corpus, dist_pool):
    """configs/cpu-gdn.yaml (the quick start's shape, Gated DeltaNet linear layers) at SP = 2, shortened, on
    the shared pool's two ranks (the launch itself is tested above), with `auto` SP methods."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "cpu-gdn.yaml")))
    assert cfg["parallel"] == {"sp": 2, "sp_layout": "zigzag"}
    run_dir = tmp_path / "gdn"
    cfg["data"].update(path=corpus, seq_len=256)
    cfg["train"].update(steps=12, eval_interval=0)
    cfg["schedule"]["warmup_steps"] = 2
    cfg["logging"] = {"run_dir": str(run_dir), "progress": False, "tensorboard": False, "plot": False}
    cfg["checkpoint"]["interval"] = 0
    cfg["parallel"]["sp_method"] = {"linear": "auto", "softmax": "auto"}  # the cost model picks, per layer kind
    dist_pool(2).run("tests.test_checkpoint:case_train", cfg=cfg, world_size=2)
    losses = [r["loss"] for r in _rows(str(run_dir))]
    assert len(losses) == 12 and losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips_as_configured(tmp_path, corpus):
    """In this process (the trainer's entry point ends with the error's traceback and status 1)."""
    from lasp.train.loop import NonFiniteError
    from tests.test_checkpoint import run

    blow_up = dict(
        optim={"lr": 1e30, "grad_clip": 0}, schedule={"warmup_steps": 0}, train={"eval_interval": 0, "steps": 30}
    )
    config, run_dir = _config(tmp_path, corpus, "stop", **blow_up)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .*; stopping \(train.nonfinite = stop\)") as e:
        run(yaml.safe_load(open(config)))
    bad = _rows(run_dir)[-1]
    assert bad["skipped"] and str(e.value).startswith(f"step {bad['step']}: non-finite")
    config, run_dir = _config(
        tmp_path,
        corpus,
        "skip",
        **{**blow_up, "train": {**blow_up["train"], "nonfinite": "skip", "max_skipped_steps": 2}},
    )
    with pytest.raises(NonFiniteError, match="3 steps skipped in a row"):
        run(yaml.safe_load(open(config)))
    assert sum(r["skipped"] for r in _rows(run_dir)) == 3


def _start(config, nproc, extra=()):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lasp.train.launcher",
            "torchrun",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *extra,
            "-m",
            "lasp.train",
            "--config",
            config,
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc, path, what):
    """Wait until `path` exists (a metrics.jsonl: until it has a step's row; the file itself is made at
    start-up, with the layout's row)."""
    deadline = time.monotonic() + 120

    def there() -> bool:
        if not path.endswith(".jsonl"):
            return os.path.exists(path)
        return bool(_rows_now(os.path.dirname(path)))

    while not there() and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: " + proc.stdout.read()[-2000:] + proc.stderr.read()[-4000:])
        time.sleep(0.05)
    assert there(), f"no {what} after 120 s"


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_exits_75_and_a_new_start_resumes(tmp_path, corpus, dist_pool, capsys):
    config, run_dir = _config(
        tmp_path,
        corpus,
        "term",
        train={"steps": 10000, "eval_interval": 0},
        parallel={"dp": 2},
        checkpoint={"interval": 0},
    )
    proc = _start(config, 2)
    _wait_for(proc, os.path.join(run_dir, "metrics.jsonl"), "its first step")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    # a second run started in the same directory meanwhile is refused, naming the first, and touches nothing
    from lasp.train.__main__ import main

    checkpoints = os.path.join(run_dir, "checkpoints")
    assert main(["--config", config, "--set", "parallel.dp=1"]) == 2
    err = capsys.readouterr().err
    holder = re.search(r"is in use by another run \(pid (\d+) on host", err)
    assert holder and holder.group(1) in workers, err
    assert _rows(run_dir) and not [n for n in os.listdir(checkpoints) if n.startswith("step-")]  # untouched
    os.kill(int(workers[-1]), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "stopping cleanly after step" in out and "stopped by" in out
    step = _rows(run_dir)[-1]["step"]
    # every worker saved and stopped early (75); the launcher says so last, with that status, not torchrun's 1
    assert proc.returncode == 75, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"stopped by SIGTERM after step {step}, with a checkpoint"), err[
        -2000:
    ]
    assert 1 <= step < 10000 and f"checkpoint step {step}: saved" in out
    # the new start (on the shared pool's two ranks: the torchrun restart is the SIGKILL test's) resumes there
    cfg = yaml.safe_load(open(config))
    cfg["train"]["steps"] = step + 2
    dist_pool(2).run("tests.test_checkpoint:case_train", cfg=cfg, world_size=2)
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, step + 3))


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_is_restarted_by_torchrun_and_the_curve_is_exact(tmp_path, corpus, dist_pool):
    slow = dict(
        model={"hidden_size": 64, "ffn_hidden_size": 128},
        data={"seq_len": 256, "global_batch": 8},
        train={"steps": 24, "eval_interval": 0},
        parallel={"sp": 2},
        checkpoint={"interval": 4},
    )
    config, ref_dir = _config(tmp_path, corpus, "straight", **slow)
    # the uninterrupted run on the shared pool's two ranks (one thread each, as the torchrun workers here)
    dist_pool(2).run("tests.test_checkpoint:case_train", cfg=yaml.safe_load(open(config)), world_size=2)
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(ref_dir)]
    config, run_dir = _config(tmp_path, corpus, "killed", **slow)
    proc = _start(config, 2, extra=["--max-restarts=1"])
    _wait_for(proc, os.path.join(run_dir, "checkpoints", "step-00000004", "COMMITTED"), "the first checkpoint")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    assert "resuming from" in out, out[-3000:]  # the restarted workers continued from a checkpoint
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(run_dir)] == want


def _two_nodes(config, port):
    """Two `launch/torchrun.sh` "nodes" of one process each on this machine (c10d rendezvous on loopback)."""
    return [
        subprocess.Popen(
            ["bash", "launch/torchrun.sh", "--config", config],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **_env(),
                "PYTHON": sys.executable,
                "NNODES": "2",
                "NODE_RANK": str(node),
                "NPROC_PER_NODE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for node in (0, 1)
    ]


@pytest.mark.slow
def test_two_nodes_through_launch_torchrun_sh_give_the_sp1_losses(tmp_path, corpus, reference):
    """SP = 2 over two torchrun "nodes" of one process each (one node, `--standalone`, goes through the same
    script in test_launch.py's worker-error test)."""
    port = _free_port()
    config, run_dir = _config(
        tmp_path, corpus, "nodes", parallel={"sp": 2, "sp_layout": "zigzag"}, train={"eval_positions": True}
    )
    procs = _two_nodes(config, port)
    outs = []
    for node, p in enumerate(procs):
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        assert f"node {node} of 2 (1 process(es) here): waiting for all 2 nodes at 127.0.0.1:{port}" in err
        outs.append(out)
    assert "tp=1 sp=2 (zigzag) pp=1 dp=1" in outs[0]
    _same_curve(run_dir, reference)
    # train.eval_positions under SP = 2: the last evaluation's buckets are the final checkpoint's, on one process
    import torch

    from lasp.data import TokenData
    from lasp.parallel.positions import document_rows, position_losses
    from lasp.train.artifacts import checkpoint_model

    logged = _rows(run_dir, "eval_positions")
    assert [r["step"] for r in logged] == [3, 6] and "eval loss by position: 1-64" in outs[0]
    val = TokenData(corpus, "val")
    model, _ = checkpoint_model(os.path.join(run_dir, "checkpoints", "step-00000006"))
    with torch.no_grad():
        want = position_losses(model.eval(), document_rows(val.tokens, val.doc_offsets, 64, 4))
    assert abs(logged[-1]["loss_1_64"] - want[0]["loss"]) <= 1e-5 * want[0]["loss"], (logged[-1], want)


@pytest.mark.slow
def test_zero2_through_the_deepspeed_launcher_with_a_localhost_hostfile_gives_the_same_losses(
    tmp_path, corpus, reference
):
    config, run_dir = _config(tmp_path, corpus, "hostfile", train={"steps": 3}, parallel={"dp": 2, "zero_stage": 2})
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    out = subprocess.run(
        ["bash", "launch/deepspeed.sh", "--config", config],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **_env(),
            "PYTHON": sys.executable,
            "HOSTFILE": str(tmp_path / "hostfile"),
            "NO_SSH": "1",
            "MASTER_PORT": str(_free_port()),
        },
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    _same_curve(run_dir, reference, steps=3)


@pytest.mark.slow
def test_a_dead_node_ends_the_other_with_an_error_not_a_hang(tmp_path, corpus):
    port = _free_port()
    config, run_dir = _config(
        tmp_path,
        corpus,
        "dead",
        train={"steps": 100000, "eval_interval": 0, "collective_timeout_s": 30},
        parallel={"sp": 2},
        checkpoint={"interval": 0, "save_on_exit": False},
    )
    procs = _two_nodes(config, port)
    _wait_for(procs[0], os.path.join(run_dir, "metrics.jsonl"), "its first step")
    workers = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True).stdout.split()
    for pid in [procs[1].pid, *map(int, workers)]:  # node 1: its torchrun agent and its worker, at once
        os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode not in (0, None), out[-2000:]
    assert time.monotonic() - start < 90
    procs[1].communicate()


def _elastic_node(config, port, log, host=False):
    """One elastic `launch/torchrun.sh` "node" of two processes (NNODES=1:2, c10d rendezvous on loopback; a
    dead node is given up on after 3 missed heartbeats of 1 s), its output into `log`.out / .err. On one
    machine every node's address is MASTER_ADDR's: `host` says which one holds the rendezvous store."""
    proc = subprocess.Popen(
        ["bash", "launch/torchrun.sh", "--config", config],
        cwd=ROOT,
        stdout=open(f"{log}.out", "w"),
        stderr=open(f"{log}.err", "w"),
        env={
            **_env(),
            "PYTHON": sys.executable,
            "NNODES": "1:2",
            "NPROC_PER_NODE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RDZV_LAST_CALL": "3",
            "RDZV_CONF": f"is_host={int(host)},keep_alive_interval=1,keep_alive_max_attempt=3",
            "MAX_RESTARTS": "1",
        },
    )
    proc.log = str(log)
    return proc


def _until(what, found, procs, timeout=180):
    """Poll `found()` until it returns something, failing with the nodes' output if a node ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = found()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                said = "".join(open(f"{p.log}.{kind}").read()[-3000:] for kind in ("out", "err"))
                pytest.fail(f"node {os.path.basename(p.log)} ended (status {p.returncode}) before {what}:\n{said}")
        time.sleep(0.05)
    pytest.fail(f"no {what} after {timeout} s")


@pytest.mark.slow
def test_an_elastic_job_loses_a_node_goes_on_alone_and_grows_again_with_the_same_batches(tmp_path, corpus, dist_pool):
    """Two elastic nodes train at sp 2 x dp 2; one is killed (agent and workers, SIGKILL): the other re-forms
    alone at sp 2 x dp 1 (4 microbatches of one row instead of 2) from the newest checkpoint; a third node
    joining grows it back to dp 2. The steps at 2 ranks, and the first 20 after the growth, equal a run resumed
    at that layout from the same checkpoint."""
    steps = 200  # the third node joins about 80 steps after the shrink here
    config, run_dir = _config(
        tmp_path,
        corpus,
        "elastic",
        train={"steps": steps, "eval_interval": 0},
        schedule={"warmup_steps": 2, "decay_steps": steps},  # the shorter runs below follow the same schedule
        parallel={"sp": 2, "dp": "auto", "micro_batch_size": 1},
        checkpoint={"interval": 10, "keep_last": 0},
    )
    checkpoints = os.path.join(run_dir, "checkpoints")

    def layouts():
        return _rows_now(run_dir, "layout")

    def committed(after):
        names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
        done = [int(n[5:]) for n in names if n.startswith("step-") and os.path.exists(f"{checkpoints}/{n}/COMMITTED")]
        return [s for s in done if s > after]

    port = _free_port()
    nodes = [_elastic_node(config, port, tmp_path / "node-a", host=True)]  # it must outlive the kill
    nodes.append(_elastic_node(config, port, tmp_path / "node-b"))
    try:
        # both nodes (a node that came late joins at a restart of the first: wait for the world of 4)
        four = _until("a layout of 4 ranks", lambda: [r for r in layouts() if r["world_size"] == 4], nodes)[-1]
        _until("a checkpoint at 4 ranks", lambda: committed(four["step"]), nodes)
        workers = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        for pid in [nodes[1].pid, *map(int, workers)]:  # node b: its torchrun agent and its workers, at once
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        nodes[1].wait()
        two = _until("a layout of 2 ranks", lambda: [r for r in layouts() if r["world_size"] == 2], nodes[:1])[-1]
        _until("a step at 2 ranks", lambda: [r for r in _rows_now(run_dir) if r["step"] > two["step"]], nodes[:1])
        print(f"from the kill to the first step at 2 ranks: {time.monotonic() - killed:.1f} s", file=sys.stderr)
        nodes.append(_elastic_node(config, port, tmp_path / "node-c"))
        for p in (nodes[0], nodes[2]):
            assert p.wait(timeout=240) == 0, (tmp_path / "node-a.err").read_text()[-4000:]
    finally:
        for p in nodes:
            p.kill() if p.poll() is None else None
    out = (tmp_path / "node-a.out").read_text()
    # node a's workers said in one line what ended their attempt (no hang, no bare gloo traceback)
    assert "a peer closed its connection during step" in (tmp_path / "node-a.err").read_text()
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 0  # with a line at each change of world
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # none skipped, none repeated
    seen = _rows(run_dir, "layout")
    assert [(r["world_size"], r["sp"], r["dp"], r["microbatches"]) for r in seen[-3:]] == [
        (4, 2, 2, 2),
        (2, 2, 1, 4),
        (4, 2, 2, 2),
    ], seen
    shrink, grow = seen[-2]["step"], seen[-1]["step"]
    assert four["step"] < shrink < grow <= steps - 20, seen
    assert "dp auto = 2 / (tp x sp x pp), 4 microbatch(es) of 1 row(s) per rank" in seen[-2]["why"]
    assert f"resuming from {checkpoints}/step-{shrink:08d}" in out and "dp 2 -> 1, microbatches 2 -> 4" in out
    assert f"resuming from {checkpoints}/step-{grow:08d}" in out and "dp 1 -> 2, microbatches 4 -> 2" in out
    # each segment: a run resumed at that layout from the same checkpoint (on the shared pools)
    cfg = yaml.safe_load(open(config))
    for world, start, end in ((2, shrink, grow), (4, grow, grow + 20)):
        again = {**cfg, "logging": {**cfg["logging"], "run_dir": str(tmp_path / f"again-{world}")}}
        again["train"] = {**cfg["train"], "steps": end, "resume": f"{checkpoints}/step-{start:08d}"}
        dist_pool(world).run("tests.test_checkpoint:case_train", cfg=again, world_size=world)
        want = _rows(again["logging"]["run_dir"])
        got = [r for r in rows if start < r["step"] <= end]
        assert [r["step"] for r in want] == [r["step"] for r in got] == list(range(start + 1, end + 1))
        for r, w in zip(got, want):
            assert abs(r["loss"] - w["loss"]) <= 1e-5 * abs(w["loss"]), (world, r, w)


@pytest.mark.slow
def test_bf16_autocast_with_activation_checkpointing_follows_the_fp32_curve(tmp_path, corpus, reference):
    config, run_dir = _config(
        tmp_path,
        corpus,
        "bf16",
        train={"dtype": "bfloat16", "activation_checkpointing": 1, "eval_interval": 0, "steps": 3},
    )
    _train(config)
    got = [r["loss"] for r in _rows(run_dir)]
    assert len(got) == 3 and all(abs(x - y) <= 1e-2 * abs(y) for x, (y, _) in zip(got, reference)), (got, reference)
