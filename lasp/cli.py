"""Checks the command-line tools share, run on the arguments before any process is spawned or any work done.

Each check returns the problems it found, one line each naming the option and its value, so a tool can
collect every problem and report them together with `usage_error` (argparse's exit status 2):

    problems = at_least("--heads", args.heads) + processes("--world-size", args.world_size)
    problems += writable("--out", args.out.with_suffix(".jsonl")) + existing("--config", args.config)
    usage_error(parser, problems)
"""

import argparse
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

PROCESSES_PER_CORE = 4
"""CPU (gloo) tools refuse more processes than this many per core: beyond it a run only thrashes."""


def at_least(option: str, values: int | Iterable[int], low: int = 1) -> list[str]:
    """`option` (one value, or the values of an nargs option) must be >= low."""
    values = [values] if isinstance(values, int) else list(values)
    return [f"{option} must be >= {low}, got {v}" for v in values if v < low]


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a container or a scheduler may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def processes(option: str, n: int, gpus: bool = False, low: int = 1) -> list[str]:
    """`option` asks for n local processes: at least `low`, and no more than this machine can run: one GPU
    each with `gpus`, else at most PROCESSES_PER_CORE per CPU core."""
    if n < low:
        return [f"{option} must be >= {low}, got {n}"]
    if gpus:
        import torch

        count = torch.cuda.device_count()
        if n > count:
            return [f"{option} {n} needs one GPU per process; this machine has {count} GPU(s)"]
        return []
    cores = cpu_cores()
    if n > PROCESSES_PER_CORE * cores:
        return [f"{option} {n} is more processes than this machine can run ({cores} CPU cores; at most "
                f"{PROCESSES_PER_CORE * cores})"]
    return []


def sequence(option: str, seq_len: int, layout: str, world_size: int) -> list[str]:
    """A sequence of `seq_len` tokens must split evenly under `layout` over `world_size` >= 1 ranks."""
    from lasp.sp.layout import SeqLayout

    try:
        SeqLayout(layout, world_size).check_global_length(seq_len)
    except ValueError as e:
        return [f"{option} {seq_len}: {e}"]
    return []


def existing(option: str, path: str | os.PathLike, directory: bool = False) -> list[str]:
    """An input the tool reads: `path` exists and is a file (a directory with `directory`); else one problem
    that says which: missing, or there but of the other kind."""
    path = Path(os.path.expanduser(path))
    if not path.exists():
        return [f"{option}: {path} does not exist"]
    if path.is_dir() != directory:
        return [f"{option}: {path} is a {'directory' if path.is_dir() else 'file'}, not a "
                f"{'directory' if directory else 'file'}"]
    return []


def _unwritable(path: Path, directory: bool) -> str | None:
    if path.exists():
        if path.is_dir() != directory:
            return "it is a directory" if path.is_dir() else "it is not a directory"
        return None if os.access(path, os.W_OK | (os.X_OK if directory else 0)) else "permission denied"
    parent = path.parent
    while not parent.exists():  # the tool makes the missing directories; the first one that is there decides
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


def writable(option: str, path: str | os.PathLike, directory: bool = False) -> list[str]:
    """The tool can create or overwrite `path` (a file, or a directory with `directory`), making any missing
    parent directories: `path` is of that kind and writable, or the nearest existing parent is a writable
    directory. Nothing is created here."""
    path = Path(os.path.abspath(path))
    reason = _unwritable(path, directory)
    return [] if reason is None else [f"{option}: cannot write to {path}: {reason}"]


def new_directory(option: str, path: str | os.PathLike, force: bool) -> list[str]:
    """An output directory the tool builds beside `path` and renames into place: `path` and its parent
    must be writable, and an existing non-empty `path` is replaced only with --force."""
    path = Path(os.path.abspath(path))
    problems = writable(option, path, directory=True) or writable(option, path.parent, directory=True)
    if not problems and path.is_dir() and any(path.iterdir()) and not force:
        problems.append(f"{option}: {path} exists and is not empty; pass --force to replace it")
    return problems


def install_directory(tmp: str | os.PathLike, output: str | os.PathLike) -> None:
    """Move the finished directory `tmp` to `output` (its sibling); an old `output` is removed only once the
    new one is in place, so a failure before this leaves `output` as it was."""
    tmp, output = Path(tmp), Path(output)
    old = output.with_name(f"{output.name}.old-{os.getpid()}")
    if output.exists():
        os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def usage_error(parser: argparse.ArgumentParser, problems: list[str]) -> None:
    """Exit with status 2 and the usage, listing every problem, if there are any."""
    if len(problems) == 1:
        parser.error(problems[0])
    if problems:
        parser.error(f"{len(problems)} problems:\n  " + "\n  ".join(problems))
