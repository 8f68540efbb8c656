"""The launch scripts: they parse (bash -n), a dry run goes through SLURM's, and the scaling sweep through
its own; a port in use is refused before any worker starts. Training through launch/torchrun.sh (one node
and two) and launch/deepspeed.sh (local and with a hostfile) is in test_train.py."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.refusals import refuse_all, refuse_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [
    "launch/torchrun.sh",
    "launch/deepspeed.sh",
    "launch/slurm.sbatch",
    "launch/bench_scaling.sh",
    "launch/node_env.sh",
    "scripts/run.sh",
    "scripts/gpu_session.sh",
    "scripts/fetch_gpu_wheels.sh",
]
DRY = ["--config", "configs/cpu-quickstart.yaml", "--dry-run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env_extra, timeout=120):
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if k not in env_extra:
            env.pop(k, None)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _assert_dry_run(stdout):
    for part in ("# mesh", "tp=1 sp=2 (zigzag) pp=1 dp=1: 2 ranks", "model FLOPs per token"):
        assert part in stdout


@pytest.mark.slow
def test_dry_run_through_slurm_sbatch(tmp_path):
    # stand-ins for SLURM's srun (runs its command once, as on a one-node job) and scontrol
    (tmp_path / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (tmp_path / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in ("srun", "scontrol"):
        (tmp_path / f).chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-001",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_SUBMIT_DIR": ROOT,
        "MASTER_PORT": str(_free_port()),
    }
    _assert_dry_run(_run(["bash", "launch/slurm.sbatch", *DRY], env))


SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge", "unmunge")
SLURM_MISSING = [t for t in SLURM_TOOLS if shutil.which(t) is None] + (["root"] if os.geteuid() != 0 else [])


@pytest.mark.slow
@pytest.mark.skipif(
    bool(SLURM_MISSING),
    reason=f"no usable SLURM here (lacks {', '.join(SLURM_MISSING)}): the check runs as root with slurm-wlm and "
    "munge installed (scripts/slurm_check.py installs them)",
)
def test_a_slurm_job_requeued_mid_run_resumes_and_equals_an_uninterrupted_one(tmp_path):
    """scripts/slurm_check.py on a private one-node SLURM: a job of launch/slurm.sbatch stopped after step 12 by
    the time limit's signal (it requeues itself) and after step 22 by `scontrol requeue` saves each time, runs
    again from its checkpoint and finishes with the losses of an uninterrupted job, bit for bit; a job with a
    wrong config fails fast with the error in its log and a non-zero exit."""
    from lasp.data import prepare

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:12]
    prepare(files, str(tmp_path / "data"), val_fraction=0.0, progress=False)
    cmd = [sys.executable, "scripts/slurm_check.py", "--no-install", "--work", str(tmp_path / "work")]
    cmd += ["--data", str(tmp_path / "data"), "--steps", "30", "--stop-at", "12", "22"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    figures = json.loads((tmp_path / "work" / "slurm_check.json").read_text())
    assert figures["requeued_job"] == {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "2"}
    assert figures["bad_config_job"]["JobState"] == "FAILED" and figures["bad_config_job"]["ExitCode"] != "0:0"
    for how, at in (("time-limit", 12), ("requeue", 22)):
        assert figures[how]["saved_step"] >= at and 0 <= figures[how]["signal_to_saved_s"] < 60, figures


@pytest.mark.slow
def test_the_scaling_sweep_runs_through_its_launcher(tmp_path):
    out = tmp_path / "sp"
    _run(
        [
            "bash",
            "launch/bench_scaling.sh",
            "--world-sizes",
            "1",
            "2",
            "--seq-lens",
            "64",
            "--tokens-per-rank",
            "--reps",
            "1",
            "--methods",
            "lasp2",
            "lasp1",
            "--out",
            str(out),
        ],
        {"NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port())},
        timeout=300,
    )
    rows = [json.loads(x) for x in (out / "measured.jsonl").read_text().splitlines()]
    ops = [r for r in rows if r["method"] != "hybrid_train_step"]
    assert len(ops) == 2 * 1 + 2 * 2  # W=1: rank 0; W=2: both ranks; two methods
    steps = [(r["W"], r["dp"]) for r in rows if r["method"] == "hybrid_train_step"]
    assert sorted(steps) == [(1, 2), (1, 2), (2, 1), (2, 1)]  # every rank: sp=1 x dp=2, then sp=2 x dp=1
    assert (out / "calibration.jsonl").stat().st_size > 0


SRUN = '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n'  # one node's srun
BAD_LAUNCHES = [  # (script, environment, what the message must say): refused before anything starts
    ("launch/torchrun.sh", {"NPROC_PER_NODE": "0"}, ["NPROC_PER_NODE must be at least 1, got 0"]),
    ("launch/torchrun.sh", {"NNODES": "abc"}, ["NNODES must be a whole number, got 'abc'"]),
    (
        "launch/torchrun.sh",
        {"NNODES": "2", "NODE_RANK": "2"},
        ["NODE_RANK must be below NNODES: NODE_RANK=2, NNODES=2"],
    ),
    ("launch/torchrun.sh", {"MASTER_PORT": "70000"}, ["MASTER_PORT must be at most 65535, got 70000"]),
    ("launch/torchrun.sh", {"NNODES": "2", "RDZV_TIMEOUT": "soon"}, ["RDZV_TIMEOUT must be a whole number"]),
    (
        "launch/torchrun.sh",
        {"NNODES": "x", "NPROC_PER_NODE": "0"},  # every problem at once
        ["NNODES must be a whole number, got 'x'", "NPROC_PER_NODE must be at least 1, got 0"],
    ),
    (
        "launch/torchrun.sh",
        {"NNODES": "3:2", "MAX_RESTARTS": "-1", "RDZV_LAST_CALL": "0"},  # elastic: a range, with its own knobs
        [
            "NNODES=3:2: the smallest number of nodes (3) is above the largest (2)",
            "MAX_RESTARTS must be a whole number, got '-1'",
            "RDZV_LAST_CALL must be at least 1, got 0",
        ],
    ),
    ("launch/torchrun.sh", {"NNODES": "1:"}, ["NNODES must be a number of nodes or a range MIN:MAX of them"]),
    ("launch/deepspeed.sh", {"NPROC_PER_NODE": "-1"}, ["NPROC_PER_NODE must be a whole number, got '-1'"]),
    ("launch/deepspeed.sh", {"MASTER_PORT": "port"}, ["MASTER_PORT must be a whole number, got 'port'"]),
    ("launch/deepspeed.sh", {"HOSTFILE": "/nonexistent/hostfile"}, ["HOSTFILE /nonexistent/hostfile does not exist"]),
    ("launch/bench_scaling.sh", {"NNODES": "0"}, ["NNODES must be at least 1, got 0"]),
    (
        "launch/slurm.sbatch",
        {"SLURM_NNODES": "2", "SLURM_NODEID": "5"},
        ["NODE_RANK must be below NNODES: NODE_RANK=5"],
    ),
    # the trainer's own check against the world the script is about to start: its message, exit 2, and no
    # launcher started (it would print its own banner, or ChildFailedError)
    (
        "launch/torchrun.sh",
        {"PYTHON": sys.executable, "NPROC_PER_NODE": "1"},
        ["world size 1 != tp x sp x pp x dp = 1 x 2 x 1 x 1", "data.path: /nonexistent does not exist"],
    ),
    (  # elastic: every world the range may form is checked (sp = 2 x dp = 1 fits 2 processes only)
        "launch/torchrun.sh",
        {"PYTHON": sys.executable, "NNODES": "1:3", "NPROC_PER_NODE": "2"},
        [
            "the config must fit every world size the launch may form (2, 4, 6)",
            "with 4 processes: world size 4 != tp x sp x pp x dp = 1 x 2 x 1 x 1",
            "with 6 processes: world size 6 != tp x sp x pp x dp",
            "data.path: /nonexistent does not exist",
        ],
    ),
    (
        "launch/deepspeed.sh",
        {"PYTHON": sys.executable, "NPROC_PER_NODE": "1"},
        ["world size 1 != tp x sp x pp x dp = 1 x 2 x 1 x 1", "data.path: /nonexistent does not exist"],
    ),
]


@pytest.mark.parametrize(
    "script, env, says",
    [  # those that reach the trainer's check (a python start): slow
        pytest.param(s, e, says, id=f"{s[7:]}-{'-'.join(e)}", marks=[pytest.mark.slow] if "PYTHON" in e else [])
        for s, e, says in BAD_LAUNCHES
    ],
)
def test_launch_scripts_refuse_bad_input_before_anything_starts(tmp_path, script, env, says):
    (tmp_path / "srun").write_text(SRUN)
    (tmp_path / "srun").chmod(0o755)
    full = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("NNODES", "NODE_RANK", "MASTER_PORT", "NPROC_PER_NODE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "HOSTFILE")
        and not k.startswith("SLURM_")
    }
    full.update({"PYTHON": "/bin/false", "SRUN": str(tmp_path / "srun"), **env})  # /bin/false: start nothing
    err = refuse_command(
        [
            "bash",
            script,
            "--config",
            "configs/cpu-quickstart.yaml",
            "--set",
            "data.path=/nonexistent",
            "--set",
            f"logging.run_dir={tmp_path / 'run'}",
        ],
        full,
        says,
        watch=[tmp_path],
        cwd=ROOT,
        timeout=120,
    )
    assert "ChildFailedError" not in err


def test_the_launcher_exits_with_the_trainers_status(tmp_path):
    from lasp.train.launcher import _statuses, outcome

    # an elastic growth left every worker's 75; the attempt after it, one rank's error: that attempt counts
    for name, text, when in [
        ("attempt-0.29500-rank-0", "75\nstopped", 100),
        ("attempt-0.29500-rank-3", "75\nstopped", 100),
        ("attempt-0.41234-rank-0", "1\nerror (rank 0): x", 200),
    ]:
        (tmp_path / name).write_text(text)
        os.utime(tmp_path / name, (when, when))
    assert _statuses(str(tmp_path)) == {0: (1, "error (rank 0): x")}

    stop = "stopped by SIGTERM after step 3, with a checkpoint: start the same command again to continue"
    assert outcome({0: (75, stop), 1: (75, stop)}, 1) == (75, [stop])  # said once
    assert outcome({0: (2, "error: a"), 1: (2, "error: a")}, 1) == (2, ["error: a"])
    assert outcome({1: (1, "error (rank 1): timeout"), 0: (75, stop)}, 1) == (1, ["error (rank 1): timeout"])
    assert outcome({}, 137) == (137, [])  # a worker that died without a word: its own status


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, report",
    [("launch/torchrun.sh", "torchrun: rank"), ("launch/deepspeed.sh", "deepspeed: the launcher exited with status 2")],
)
def test_a_worker_error_is_the_last_thing_printed_with_its_status(tmp_path, script, report):
    """A checkpoint that passes the launch check (it has its marker) but is damaged: every worker refuses it
    (exit 2); the launcher ends with the trainer's message and status 2, not its own report and 1."""
    from lasp.data import prepare

    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    (ckpt / "COMMITTED").write_text(json.dumps({"files": {"__0_0.distcp": 10}}))
    data = tmp_path / "data"
    (tmp_path / "doc.txt").write_text("def f():\n    return 1\n" * 400)
    prepare([str(tmp_path / "doc.txt")], str(data), progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HOSTFILE")}
    out = subprocess.run(
        [
            "bash",
            script,
            "--config",
            "configs/cpu-quickstart.yaml",
            "--set",
            f"data.path={data}",
            "--set",
            f"train.resume={ckpt}",
            "--set",
            "train.eval_interval=0",
            "--set",
            f"logging.run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port())},
    )
    assert out.returncode == 2, out.stderr[-3000:]
    tail = out.stderr[out.stderr.rindex(report) :]  # the launcher's one line, then the trainer's message
    assert f"checkpoint {ckpt} is damaged" in tail and tail.rstrip().endswith("__0_0.distcp is missing"), tail
    assert "ChildFailedError" not in out.stderr


@pytest.fixture
def taken_port():
    """A port that a program on this machine listens on (this test, on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "argv, option",
    [
        (
            [
                "torchrun",
                "--nnodes",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                "{port}",
                "--nproc-per-node",
                "1",
                "-m",
                "lasp.train",
            ],
            "--master-port",
        ),
        (
            [
                "torchrun",
                "--nnodes",
                "2",
                "--node-rank",
                "0",
                "--rdzv-endpoint",
                "127.0.0.1:{port}",
                "--nproc-per-node",
                "1",
                "-m",
                "lasp.train",
            ],
            "--rdzv-endpoint",
        ),
        (["deepspeed", "--num_gpus", "1", "--master_port", "{port}", "--module", "lasp.train"], "--master_port"),
    ],
    ids=["torchrun", "torchrun-endpoint", "deepspeed"],
)
def test_a_port_in_use_is_refused_before_any_worker_starts(taken_port, argv, option, capsys, monkeypatch):
    from lasp.train.launcher import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    argv = [a.format(port=taken_port) for a in argv] + ["--config", "/nonexistent.yaml"]
    refuse_all(
        main,
        [(argv, f"port {taken_port} on 127.0.0.1 is in use (by another run?): pass another {option} / MASTER_PORT")],
        capsys,
    )


def test_only_the_node_that_listens_tries_its_port(tmp_path, taken_port):
    from lasp.train.distributed import port_problem
    from lasp.train.launcher import _deepspeed_listens, _torchrun_listens

    run = ["--nproc-per-node", "1", "-m", "lasp.train"]
    assert _torchrun_listens(["--standalone", *run]) is None
    assert _torchrun_listens(["--nnodes", "1", *run]) is None  # torchrun picks a free port itself
    assert _torchrun_listens(["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", *run]) is None
    assert _torchrun_listens(["--nnodes", "2", "--master-addr", "10.0.0.1", *run]) == (
        "10.0.0.1",
        29500,
        "--master-port",
    )
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    ds = ["--hostfile", str(tmp_path / "hostfile"), "--master_addr", "node-a", "--master_port", "1234"]
    assert _deepspeed_listens([*ds, "--module", "lasp.train"]) is None  # over ssh: rank 0 may run elsewhere
    assert _deepspeed_listens([*ds, "--no_ssh", "--node_rank", "1", "--module", "lasp.train"]) is None
    assert _deepspeed_listens([*ds, "--no_ssh", "--node_rank", "0", "--module", "lasp.train"]) == (
        "node-a",
        1234,
        "--master_port",
    )
    assert port_problem("127.0.0.1", _free_port(), "--master-port") is None
    assert "is in use" in port_problem("127.0.0.1", taken_port, "--master-port")


def test_a_rank_0_that_cannot_listen_says_which_port(taken_port, monkeypatch):
    """Under the deepspeed launcher rank 0 itself listens on MASTER_PORT: a port taken after the launcher's
    check is a ConfigError (the trainer exits 2 with that line), not torch's DistNetworkError."""
    import torch

    from lasp.train.config import ConfigError
    from lasp.train.distributed import Launch, init_distributed

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken_port)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(ConfigError, match=f"port {taken_port} on 127.0.0.1 is in use"):
        init_distributed(Launch(0, 2, 0, True), torch.device("cpu"), 10)
