"""python -m lasp.train.launcher torchrun|deepspeed [the launcher's arguments] ... lasp.train --config ...

torchrun or the deepspeed launcher, as `launch/torchrun.sh` and `launch/deepspeed.sh` run them, with the
trainer's exit status. When a worker fails, torchrun prints a ChildFailedError report and exits 1 whatever
the worker said; the deepspeed launcher logs its own lines after the worker's message. Here each rank of
`lasp.train` leaves its status and message in a directory (LASP_STATUS_DIR); after the run this prints one
line on the launcher's outcome, then that message last, and exits with its status: 2 for a config or
checkpoint error (nothing trained), 75 for a clean stop that saved a checkpoint (start again to continue),
1 otherwise. Each launcher is its own code, run in this process: signals reach it as before.

Before any worker starts, the port the job listens on here is tried when it was given (torchrun's
--master-port on node 0, the deepspeed launcher's --master_port where its rank 0 runs): one that is taken
ends the launch with one line and status 2 instead of a traceback from the store.
"""

import os
import signal
import sys
import tempfile

from lasp.train.__main__ import EXIT_STOPPED, STATUS_DIR
from lasp.train.distributed import port_problem


def _statuses(directory: str) -> dict[int, tuple[int, str]]:
    """rank -> (status, message) of the last attempt that left any (a restart's workers write apart from the
    attempt before: `attempt-<restart>.<port>-rank-<rank>`, see lasp.train.__main__._status)."""
    attempts: dict[str, dict[int, tuple[int, str]]] = {}
    newest: dict[str, float] = {}
    for name in os.listdir(directory):
        attempt, sep, rank = name.partition("-rank-")
        if not (sep and attempt.startswith("attempt-") and rank.isdigit()):
            continue
        path = os.path.join(directory, name)
        with open(path) as f:
            code, _, message = f.read().partition("\n")
        attempts.setdefault(attempt, {})[int(rank)] = (int(code), message.strip())
        newest[attempt] = max(newest.get(attempt, 0.0), os.path.getmtime(path))
    return attempts[max(newest, key=newest.get)] if attempts else {}


def outcome(statuses: dict[int, tuple[int, str]], fallback: int) -> tuple[int, list[str]]:
    """(exit status, messages to print last) from the ranks' statuses: a config or checkpoint error (2)
    first, then a clean stop (75) when every rank that reported stopped cleanly, else `fallback`."""
    codes = {code for code, _ in statuses.values()}
    if 2 in codes:
        code = 2
    elif codes == {EXIT_STOPPED}:
        code = EXIT_STOPPED
    else:
        code = fallback
    messages = []
    for rank in sorted(statuses):
        if statuses[rank][0] == code and statuses[rank][1] not in messages:
            messages.append(statuses[rank][1])
    return code, messages


def _torchrun(argv: list[str]) -> tuple[int, str]:
    """torchrun -> (0, "") when every worker finished, else (its status, one line on what happened)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
        return 0, ""
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        return (
            failure.exitcode if failure.exitcode > 0 else 1,
            f"torchrun: rank {rank} (pid {failure.pid}) exited with status {failure.exitcode}",
        )
    except SignalException as e:
        return 128 + int(e.sigval), f"torchrun: stopped by signal {e.sigval.name}"


def _deepspeed(argv: list[str]) -> tuple[int, str]:
    """The deepspeed launcher -> (0, "") or (its status, one line). It starts one child (its per-node
    launcher, which starts the workers) and, on one node, leaves signals to the default: SIGTERM / SIGINT
    sent here are passed to that child, which stops the workers (30 s grace) before it exits."""
    import psutil
    from deepspeed.launcher.runner import main as run

    def forward(signum, frame):
        children = psutil.Process().children()
        if not children:  # nothing started yet: stop here
            sys.exit(128 + signum)
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        run(argv)
        return 0, ""
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        return code, "" if code == 0 else f"deepspeed: the launcher exited with status {code}"


def _torchrun_listens(argv: list[str]) -> tuple[str, int, str] | None:
    """(host, port, option) of the static rendezvous store this node's torchrun would listen on (node 0); None
    where torchrun picks a free port (--standalone, or one node without --master-port), another node listens,
    or another rendezvous backend decides."""
    from torch.distributed.run import parse_args, parse_min_max_nnodes

    a = parse_args(argv)
    if a.standalone or a.rdzv_backend != "static" or a.node_rank != 0:
        return None
    if a.rdzv_endpoint:
        host, _, port = a.rdzv_endpoint.rpartition(":")
        return host, int(port), "--rdzv-endpoint"
    if a.master_port is None and parse_min_max_nnodes(a.nnodes)[1] == 1:
        return None
    return a.master_addr, 29500 if a.master_port is None else a.master_port, "--master-port"


def _deepspeed_listens(argv: list[str]) -> tuple[str, int, str] | None:
    """(host, port, option) its rank 0 listens on when that runs on this node: without a hostfile (one node),
    or with --no_ssh as node 0; None when the launcher reaches the hosts over ssh (rank 0 may be elsewhere)."""
    from deepspeed.launcher.runner import parse_args

    a = parse_args(argv)
    if not os.path.isfile(a.hostfile):
        return "127.0.0.1", a.master_port, "--master_port"
    if a.no_ssh and a.node_rank == 0:
        return a.master_addr, a.master_port, "--master_port"
    return None


LAUNCHERS = {"torchrun": (_torchrun, _torchrun_listens), "deepspeed": (_deepspeed, _deepspeed_listens)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in LAUNCHERS:
        print(
            f"{__doc__.strip()}\n\nerror: the first argument must be one of {', '.join(LAUNCHERS)}, got "
            f"{argv[0] if argv else 'nothing'}",
            file=sys.stderr,
        )
        return 2
    launch, listens = LAUNCHERS[argv[0]]
    where = listens(argv[1:])
    problem = where and port_problem(*where)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lasp-status-") as status_dir:
        os.environ[STATUS_DIR] = status_dir  # the workers inherit it
        fallback, report = launch(argv[1:])
        if fallback == 0:
            return 0
        code, messages = outcome(_statuses(status_dir), fallback)
        print(report, file=sys.stderr)
        for message in messages:
            print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
