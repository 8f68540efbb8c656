"""SLURM for real, on this one machine: preempt a training job, requeue it, and check that it resumes exactly.

    sudo .venv/bin/python scripts/slurm_check.py [--work DIR] [--no-install] [--data DIR] [--steps 60]
                                                 [--stop-at 25 45]

Root only. What it does to the machine:
- installs Debian's `slurm-wlm` and `munge` with apt-get when slurmctld, slurmd, sbatch or munged is missing
  (not with --no-install); the packages stay installed;
- starts munged (as the munge user, creating /run/munge for it) when no munge daemon answers, and stops it at the
  end;
- runs its own slurmctld and slurmd in the foreground from a slurm.conf under --work (ports picked free, state,
  spool and logs there too, clients pointed at it with SLURM_CONF): /etc/slurm is neither read nor written, and
  a SLURM already running here is left alone. Both daemons stop at the end; --work stays, with the logs.

The check (docs/checkpoints.md, "Preemption under SLURM"):
1. launch/slurm.sbatch trains a small model at SP = 2 on 2 processes for --steps steps (checkpoints every 10).
   After the first --stop-at step, SIGUSR1 reaches the batch shell as at the time limit (`--signal=B:USR1`): the
   script stops the steps, the trainer saves, the script requeues the job. After the second, `scontrol requeue`
   stops it as a preemption does (SIGTERM to every process, the same save) and SLURM requeues it. Each run
   resumes from the checkpoint the one before saved; the third finishes.
2. The same job with no interruption.
3. Every step is in the requeued job's metrics.jsonl once, and its losses equal the uninterrupted job's bit for
   bit; its log (one file, appended by the three runs) tells every run.
4. A job whose config is wrong fails within seconds: the config's error in its log, a non-zero ExitCode.
Prints the figures (the signal to the saved checkpoint, the saved checkpoint to the first step after the
requeue) and writes them to <work>/slurm_check.json. Exit status 0 when every check passed, 1 when one failed,
2 for bad arguments or a machine where it cannot run.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lasp.train.ckpt_store import MARKER, list_checkpoints  # noqa: E402
from lasp.train.metrics import read_rows  # noqa: E402

CRED_EXPIRE = 20
TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge", "unmunge")
MODEL = [  # the quick start's shape, smaller and shorter: seconds per run on 2 cores
    "--config",
    "configs/cpu-quickstart.yaml",
    "--set",
    "model.hidden_size=64",
    "--set",
    "model.ffn_hidden_size=176",
    "--set",
    "data.seq_len=128",
    "--set",
    "train.eval_interval=0",
    "--set",
    "checkpoint.interval=10",
    "--set",
    "checkpoint.keep_last=0",
    "--set",
    "logging.progress=false",
    "--set",
    "logging.tensorboard=false",
    "--set",
    "logging.plot=false",
]


class CheckFailed(Exception):
    pass


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} exited with {out.returncode}: {(out.stdout + out.stderr).strip()[-2000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what: str, probe, timeout: float, every: float = 0.2):
    """Poll `probe` until it returns something truthy; CheckFailed naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = probe()
        if got:
            return got
        time.sleep(every)
    raise CheckFailed(f"no {what} after {timeout:.0f} s")


class Machine:
    """munged (if none answers) and a private slurmctld + slurmd; `stop` undoes what `start` did."""

    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None
        self.made_run_munge = False
        self.env = dict(os.environ)

    def install(self, allowed: bool) -> None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if not missing:
            return
        if not allowed:
            raise CheckFailed(f"missing {', '.join(missing)}; install slurm-wlm and munge, or run without --no-install")
        say(f"missing {', '.join(missing)}: apt-get install -y slurm-wlm munge")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env, timeout=900)

    def munge_answers(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            back = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return cred.returncode == 0 and back.returncode == 0

    def start_munge(self) -> None:
        if self.munge_answers():
            say("munged: one is running already; using it")
            return
        run_dir = Path("/run/munge")
        if not run_dir.exists():
            run_dir.mkdir(mode=0o755)
            shutil.chown(run_dir, "munge", "munge")
            self.made_run_munge = True
        elif run_dir.owner() != "munge":
            raise CheckFailed(f"{run_dir} belongs to {run_dir.owner()}, not munge: munged will not start there")
        say("munged: starting it as the munge user")
        run(["runuser", "-u", "munge", "--", "munged"])
        until("answer from munged", self.munge_answers, 20)
        pidfile = run_dir / "munged.pid"
        self.munged_pid = int(pidfile.read_text()) if pidfile.exists() else None

    def start_slurm(self) -> None:
        host = socket.gethostname().split(".")[0]
        slurm = self.work / "slurm"
        for d in ("state", "spool", "log"):
            (slurm / d).mkdir(parents=True, exist_ok=True)
        conf = slurm / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "# written by scripts/slurm_check.py: a one-node SLURM for the preemption check",
                    "ClusterName=lasp-check",
                    f"SlurmctldHost={host}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "KillWait=60",  # SIGTERM to SIGKILL on a requeue: the trainer's save fits (default 30 s)
                    "MinJobAge=3600",  # scontrol show job keeps finished jobs (no accounting database here)
                    # a requeued job waits cred_expire + 1 s before it may start (120 s by default)
                    f"AuthInfo=cred_expire={CRED_EXPIRE}",
                    "SchedulerParameters=sched_interval=5",  # and the main scheduler looks every 60 s by default
                    f"StateSaveLocation={slurm / 'state'}",
                    f"SlurmdSpoolDir={slurm / 'spool'}",
                    f"SlurmctldPidFile={slurm / 'slurmctld.pid'}",
                    f"SlurmdPidFile={slurm / 'slurmd.pid'}",
                    f"SlurmctldLogFile={slurm / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={slurm / 'log' / 'slurmd.log'}",
                    f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
                    f"PartitionName=check Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env["SLURM_CONF"] = str(conf)
        say(f"slurmctld and slurmd: starting them on {conf}")
        for daemon in (["slurmctld", "-D", "-c", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf)]):
            log = open(slurm / "log" / f"{daemon[0]}.stdout", "w")
            self.procs.append(subprocess.Popen(daemon, stdout=log, stderr=subprocess.STDOUT, env=self.env))
            time.sleep(1)

        def idle():
            for p in self.procs:
                if p.poll() is not None:
                    raise CheckFailed(f"{p.args[0]} exited with {p.returncode}; see {slurm / 'log'}")
            out = run(["sinfo", "-h", "-o", "%T"], env=self.env, check=False)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        until("idle node in sinfo", idle, 60, every=0.5)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, 15)
            except ProcessLookupError:
                pass
        if self.made_run_munge:
            time.sleep(1)
            shutil.rmtree("/run/munge", ignore_errors=True)


def job(machine: Machine, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, RestartCnt, ...)."""
    out = run(["scontrol", "show", "job", "-o", job_id], env=machine.env).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def submit(machine: Machine, work: Path, name: str, args: list[str]) -> str:
    env = {**machine.env, "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    out = run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            "--nodes=1",
            "--gpus-per-node=0",
            f"--cpus-per-task={os.cpu_count()}",
            "--time=30",
            f"--chdir={ROOT}",
            f"--output={work / name}-%j.out",
            "--export=ALL",
            str(ROOT / "launch" / "slurm.sbatch"),
            *args,
        ],
        env=env,
    )
    job_id = out.stdout.strip().split(";")[0]
    say(f"submitted {name}: job {job_id}")
    return job_id


def finished(machine: Machine, job_id: str, timeout: float) -> dict[str, str]:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
    return until(f"end of job {job_id}", lambda: (j := job(machine, job_id))["JobState"] in done and j, timeout, 1)


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_rows(str(run_dir / "metrics.jsonl")) if r.get("kind") == "train"]


def interrupt(machine: Machine, job_id: str, how: str, at: int, run_dir: Path, log: Path, run_no: int) -> dict:
    """Stop job `job_id` after step `at` as the time limit does (SIGUSR1 to the batch shell: the script stops
    the steps and requeues the job) or as a preemption does (scontrol requeue); wait for the checkpoint and for
    the first step of the job's next run. Returns the step saved and the times."""
    until(f"step {at} of job {job_id}", lambda: len(train_rows(run_dir)) >= at, 600, 0.1)
    signal_at = time.time()
    if how == "time-limit":
        run(["scancel", "--batch", "--signal=USR1", job_id], env=machine.env)
    else:
        run(["scontrol", "requeue", job_id], env=machine.env)
    at_signal = train_rows(run_dir)[-1]["step"]
    what = "SIGUSR1 to the batch shell" if how == "time-limit" else "scontrol requeue"
    say(f"job {job_id}: {what} after step {at_signal}")
    until(
        f"the end of job {job_id}'s run {run_no}",
        lambda: log.read_text().count("the launcher exited") >= run_no,
        180,
        0.2,
    )
    saved, path = list_checkpoints(str(run_dir / "checkpoints"))[-1]
    if saved < at_signal:
        raise CheckFailed(f"the newest checkpoint after the signal is step {saved}, before step {at_signal}")
    saved_at = os.path.getmtime(os.path.join(path, MARKER))
    out = {"saved_step": saved, "signal_to_saved_s": round(saved_at - signal_at, 1)}
    say(f"job {job_id}: checkpoint of step {saved} committed {out['signal_to_saved_s']} s after the signal")
    until(f"a step after {saved} in job {job_id}'s next run", lambda: train_rows(run_dir)[-1]["step"] > saved, 600, 0.1)
    out["saved_to_first_step_s"] = round(time.time() - saved_at, 1)
    say(f"job {job_id}: its next run trained step {saved + 1} {out['saved_to_first_step_s']} s after the save")
    return out


def check(work: Path, data: Path, steps: int, stop_at: tuple[int, int], machine: Machine) -> dict:
    figures: dict = {"steps": steps, "stop_at": list(stop_at), "cred_expire_s": CRED_EXPIRE}
    runs = {name: work / f"run-{name}" for name in ("requeued", "straight")}
    common = [*MODEL, "--set", f"data.path={data}", "--set", f"train.steps={steps}"]

    # 1. stopped twice and run again each time: the time limit's signal, then a requeue
    rid = submit(machine, work, "requeued", [*common, "--set", f"logging.run_dir={runs['requeued']}"])
    log = work / f"requeued-{rid}.out"
    for run_no, (how, at) in enumerate(zip(("time-limit", "requeue"), stop_at), start=1):
        figures[how] = interrupt(machine, rid, how, at, runs["requeued"], log, run_no)
    end = finished(machine, rid, 900)
    figures["requeued_job"] = {k: end.get(k) for k in ("JobState", "ExitCode", "Restarts")}
    if end["JobState"] != "COMPLETED" or end["ExitCode"] != "0:0":
        raise CheckFailed(f"requeued job {rid} ended {end['JobState']} with ExitCode {end['ExitCode']}")

    # 2. uninterrupted
    sid = submit(machine, work, "straight", [*common, "--set", f"logging.run_dir={runs['straight']}"])
    end = finished(machine, sid, 900)
    if end["JobState"] != "COMPLETED" or end["ExitCode"] != "0:0":
        raise CheckFailed(f"uninterrupted job {sid} ended {end['JobState']} with ExitCode {end['ExitCode']}")

    # 3. the same steps and losses, bit for bit; one log telling both runs
    got, want = train_rows(runs["requeued"]), train_rows(runs["straight"])
    if [r["step"] for r in got] != list(range(1, steps + 1)):
        raise CheckFailed(f"the requeued job's steps are not 1..{steps} once each: {[r['step'] for r in got]}")
    if [r["step"] for r in want] != list(range(1, steps + 1)):
        raise CheckFailed(f"the uninterrupted job's steps are not 1..{steps}: {[r['step'] for r in want]}")
    differ = [(a["step"], a["loss"], b["loss"]) for a, b in zip(got, want) if a["loss"] != b["loss"]]
    if differ:
        raise CheckFailed(
            f"{len(differ)} step(s) differ from the uninterrupted run, e.g. (step, requeued, straight) {differ[:3]}"
        )
    text = log.read_text()
    ckpts = runs["requeued"] / "checkpoints"
    parts = [f"job {rid} (run {n})" for n in (1, 2, 3)] + [f"requeueing job {rid}"]
    parts += [f"resuming from {ckpts}/step-{figures[h]['saved_step']:08d}" for h in ("time-limit", "requeue")]
    for part in parts:
        if part not in text:
            raise CheckFailed(f"the requeued job's log ({log}) lacks {part!r}")
    say(f"the requeued job's {steps} steps equal the uninterrupted job's bit for bit")

    # 4. a wrong config fails fast, with its error in the log and a non-zero exit
    start = time.monotonic()
    bad = [*common, "--set", "model.num_heads=0", "--set", f"logging.run_dir={work / 'run-bad'}"]
    bid = submit(machine, work, "bad-config", bad)
    end = finished(machine, bid, 300)
    figures["bad_config_s"] = round(time.monotonic() - start, 1)
    figures["bad_config_job"] = {k: end.get(k) for k in ("JobState", "ExitCode")}
    log = (work / f"bad-config-{bid}.out").read_text()
    if end["JobState"] != "FAILED" or end["ExitCode"] == "0:0" or "model.num_heads must be >= 1, got 0" not in log:
        raise CheckFailed(f"bad-config job {bid}: {end['JobState']}, ExitCode {end['ExitCode']}, log: {log[-1500:]}")
    say(f"the wrong config failed in {figures['bad_config_s']} s: {end['JobState']}, ExitCode {end['ExitCode']}")
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/slurm_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the SLURM files, runs and logs go (default: a new temporary directory)",
    )
    p.add_argument("--no-install", action="store_true", help="fail instead of installing slurm-wlm and munge")
    p.add_argument(
        "--data", type=Path, default=ROOT / "data" / "stdlib", help="prepared token data (python -m lasp.data prepare)"
    )
    p.add_argument("--steps", type=int, default=60)
    p.add_argument(
        "--stop-at",
        type=int,
        nargs=2,
        default=[25, 45],
        metavar=("TIME_LIMIT", "REQUEUE"),
        help="the steps after which the time limit's signal, then scontrol requeue, stop the job (not "
        "checkpoints' steps: they come every 10)",
    )
    a = p.parse_args(argv)
    problems = []
    if a.steps < 2:
        problems.append(f"--steps must be at least 2, got {a.steps}")
    first, second = a.stop_at
    if not 1 <= first < second < a.steps:
        problems.append(f"--stop-at must be two steps with 1 <= first < second < --steps = {a.steps}, got {a.stop_at}")
    if os.geteuid() != 0:
        problems.append("run as root: it installs packages and starts munged, slurmctld and slurmd")
    if not (a.data / "meta.json").exists():
        problems.append(
            f"--data {a.data}: no prepared data there (python -m lasp.data prepare; scripts/run.sh makes data/stdlib)"
        )
    if problems:
        print("\n".join(f"error: {x}" for x in problems), file=sys.stderr)
        return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="lasp-slurm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = Machine(work.resolve())
    say(f"working in {machine.work}")
    try:
        machine.install(not a.no_install)
        machine.start_munge()
        machine.start_slurm()
        figures = check(machine.work, a.data.resolve(), a.steps, tuple(a.stop_at), machine)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        machine.stop()
    (machine.work / "slurm_check.json").write_text(json.dumps(figures, indent=1) + "\n")
    say(f"PASSED; figures in {machine.work / 'slurm_check.json'}: {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
