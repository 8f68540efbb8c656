"""python -m lasp.train.torchrun [torchrun's arguments] -m lasp.train --config ...

torchrun, as `launch/torchrun.sh` runs it, with the trainer's exit status: when a worker fails, torchrun
prints a ChildFailedError report and exits 1 whatever the worker said. Here each rank of `lasp.train`
leaves its status and message in a directory (LASP_STATUS_DIR); after the run this prints that message
last and exits with its status: 2 for a config or checkpoint error (nothing trained), 75 for a clean stop
that saved a checkpoint (start again to continue), 1 otherwise. Signals reach torchrun as before: this is
torchrun's own code in the same process.
"""

import os
import sys
import tempfile

from lasp.train.__main__ import EXIT_STOPPED, STATUS_DIR


def _statuses(directory: str) -> dict[int, tuple[int, str]]:
    out = {}
    for name in os.listdir(directory):
        if name.startswith("rank-"):
            with open(os.path.join(directory, name)) as f:
                code, _, message = f.read().partition("\n")
            out[int(name[5:])] = (int(code), message.strip())
    return out


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


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lasp-status-") as status_dir:
        os.environ[STATUS_DIR] = status_dir  # the workers inherit it
        try:
            run(args)
            return 0
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            fallback = failure.exitcode if failure.exitcode > 0 else 1
            report = f"torchrun: rank {rank} (pid {failure.pid}) exited with status {failure.exitcode}"
        except SignalException as e:
            fallback, report = 128 + int(e.sigval), f"torchrun: stopped by signal {e.sigval.name}"
        code, messages = outcome(_statuses(status_dir), fallback)
        print(report, file=sys.stderr)
        for message in messages:
            print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
