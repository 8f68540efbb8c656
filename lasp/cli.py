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
import tempfile
from collections.abc import Callable, Iterable
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
        return [
            f"{option} {n} is more processes than this machine can run ({cores} CPU cores; at most "
            f"{PROCESSES_PER_CORE * cores})"
        ]
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
        return [
            f"{option}: {path} is a {'directory' if path.is_dir() else 'file'}, not a "
            f"{'directory' if directory else 'file'}"
        ]
    return []


def _restore_mtime(directory: Path, stat: os.stat_result) -> None:
    """Put back the modification time a probe's create-and-remove changed: a check leaves no trace."""
    try:
        os.utime(directory, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    except OSError:  # not ours to touch (another owner's directory): the probe is gone all the same
        pass


def _try_writing(path: Path, directory: bool) -> str | None:
    """Write at `path` for real and undo it: None when that worked, else why not. For a missing path, a
    directory of a unique name is made in its nearest existing parent and removed again (never `path`
    itself: the ranks of one run check the same path at once, and one's check must not meet another's); an
    existing directory gets a probe file of a unique name, an existing file is opened for appending (nothing
    written). Only what this call created is removed."""
    if path.exists():
        if path.is_dir() != directory:
            return "it is a directory" if path.is_dir() else "it is not a directory"
        try:
            if not directory:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
                return None
            before = path.stat()
            fd, probe = tempfile.mkstemp(prefix=".lasp-write-probe-", dir=path)
            os.close(fd)
            os.unlink(probe)
            _restore_mtime(path, before)
        except OSError as e:
            return f"{path} is not writable ({e.strerror or e})"
        return None
    parent = path.parent
    while not parent.exists():  # the tool makes the missing directories; the first one that is there decides
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    before = parent.stat()
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lasp-write-probe-", dir=parent))
    except OSError as e:
        return f"{parent} is not writable (creating a directory in it failed: {e.strerror or e})"
    _restore_mtime(parent, before)
    return None


def writable(option: str, path: str | os.PathLike, directory: bool = False) -> list[str]:
    """The tool can create or overwrite `path` (a file, or a directory with `directory`), making any missing
    parent directories. Checked by trying (permission bits do not tell: root, read-only mounts, /proc):
    what the try creates is removed again, and the parent's modification time put back."""
    path = Path(os.path.abspath(os.path.expanduser(path)))
    reason = _try_writing(path, directory)
    return [] if reason is None else [f"{option}: cannot write to {path}: {reason}"]


def _related(output: Path, inputs: Iterable[str | os.PathLike]) -> list[str]:
    """How `output` touches the tool's own inputs: it is one, holds one, or lies inside one."""
    out, found = Path(os.path.realpath(output)), []
    for given in inputs:
        inp = Path(os.path.realpath(os.path.expanduser(given)))
        if inp == out:
            found.append(f"is the input {given}")
        elif out in inp.parents:
            found.append(f"holds the input {given}")
        elif inp in out.parents:
            found.append(f"lies inside the input {given}")
    return found


def _names(entries: Iterable[str], most: int = 6) -> str:
    entries = sorted(entries)
    more = f" and {len(entries) - most} more" if len(entries) > most else ""
    return ", ".join(entries[:most]) + more


def new_directory(
    option: str,
    path: str | os.PathLike,
    force: bool,
    made: Callable[[Path], set[str] | str],
    own: str,
    inputs: Iterable[str | os.PathLike] = (),
) -> list[str]:
    """An output directory the tool builds beside `path` and renames into place (`install_directory`).

    `path` and its parent must be writable; `path` must not be, hold or lie inside one of the tool's
    `inputs`. An existing non-empty `path` is replaced only with `force`, and only when it is the tool's own
    output: `made(path)` reads its manifest and gives the names the tool wrote there (anything else in it is
    someone else's, and refused by name), or says why it is not the tool's ("has no meta.json"). `own`
    names the tool's output in the messages ("a dataset made by lasp.data prepare")."""
    path = Path(os.path.abspath(os.path.expanduser(path)))
    problems = writable(option, path, directory=True) or writable(option, path.parent, directory=True)
    problems += [f"{option}: {path} {how}: a tool does not write over its own inputs" for how in _related(path, inputs)]
    if problems or not path.is_dir() or not any(path.iterdir()):
        return problems
    names, held = made(path), {p.name + ("/" if p.is_dir() else ""): p for p in path.iterdir()}
    if isinstance(names, str):
        return [
            f"{option}: {path} is not empty and {names} (it holds {_names(held)}): --force replaces only "
            f"{own}; choose another directory"
        ]
    others = [name for name, p in held.items() if p.name not in names]
    if others:
        return [
            f"{option}: {path} is {own} but also holds what the tool did not write ({_names(others)}): "
            "--force does not remove them; move them away, or choose another directory"
        ]
    if not force:
        return [f"{option}: {path} exists and is not empty ({own}); pass --force to replace it"]
    return []


def install_directory(tmp: str | os.PathLike, output: str | os.PathLike) -> str | None:
    """Move the finished directory `tmp` to `output` (its sibling); an old `output` is removed only once the
    new one is in place, so a failure before this leaves `output` as it was. Callers check the old one with
    `new_directory` first. Returns one line saying what was removed (None: nothing was there)."""
    tmp, output = Path(tmp), Path(output)
    old = output.with_name(f"{output.name}.old-{os.getpid()}")
    said = None
    if output.exists():
        entries, files = list(output.iterdir()), [p for p in output.rglob("*") if p.is_file()]
        if entries:
            size = sum(p.stat().st_size for p in files)
            said = (
                f"removed the previous {output}: {len(files)} file(s), {size / 1e6:.1f} MB "
                f"({_names(p.name + ('/' if p.is_dir() else '') for p in entries)})"
            )
        os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)
    return said


def usage_error(parser: argparse.ArgumentParser, problems: list[str]) -> None:
    """Exit with status 2 and the usage, listing every problem, if there are any."""
    if len(problems) == 1:
        parser.error(problems[0])
    if problems:
        parser.error(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def available_memory(device) -> tuple[int, str] | None:
    """(bytes a new allocation can take on `device` now, what that number is), None where nothing says. A
    GPU: its free memory (torch.cuda.mem_get_info) plus what torch's allocator holds unused there. The CPU:
    MemAvailable of /proc/meminfo (free memory plus what the kernel can reclaim without swapping), else the
    free pages."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), "free on the GPU"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    except (ValueError, OSError):  # a system without these names
        return None


def memory(option: str, value, need: int, device, lower: str) -> list[str]:
    """`option` = `value` needs at least `need` bytes on `device` at once (a lower bound from the model's
    shape, lasp.model.decode.forward_memory): a problem when the device has less available, naming both
    sizes and what to lower."""
    have = available_memory(device)
    if have is None or need <= have[0]:
        return []
    return [
        f"{option} {value}: needs at least {need / 2**30:,.1f} GiB on {device}, but {have[0] / 2**30:,.1f} "
        f"GiB are available ({have[1]}): {lower}"
    ]
