"""What a command-line tool must do with bad input, checked the same way for every entry point: exit status
2, no traceback, a message that names the problem, nothing existing changed and no process left behind.

    refuse_all(main, [(argv, "what the message says", ...), ...], capsys, watch=[tmp_path])
    refuse_command(["bash", "launch/torchrun.sh", ...], env, ["NNODES must be"], watch=[tmp_path])
"""

import os
import subprocess
import tempfile
from pathlib import Path

import psutil


def tree(*paths) -> dict:
    """Every file and directory under `paths` with its size and modification time: equal before and after
    means nothing was created, removed or written."""
    out = {}
    for root in map(Path, paths):
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def call(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a CLI's `main(argv)` here -> (exit status, stderr); argparse's usage errors are SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _check(what, code: int, err: str, says) -> None:
    assert code == 2, f"{what}: exit status {code}, not 2\n{err[-3000:]}"
    assert "Traceback" not in err, f"{what}: a traceback\n{err[-3000:]}"
    for part in says:
        assert part in err, f"{what}: the message does not say {part!r}\n{err[-3000:]}"


def refuse_all(main, cases: list[tuple], capsys, watch=()) -> None:
    """Each case (argv, *what the message must say) is refused by `main`; the paths in `watch` are as they
    were and this process has no new child afterwards."""
    before, children = tree(*watch), _children()
    for argv, *says in cases:
        _check(argv, *call(main, argv, capsys), says)
    assert tree(*watch) == before, "a refused command changed files"
    assert _children() <= children, "a refused command left a process behind"


def refuse_command(cmd: list[str], env: dict, says, watch=(), cwd=None, timeout: float = 60) -> str:
    """`cmd` (a script) exits 2 with `says` on stderr and no traceback, changes nothing under `watch`, and
    leaves no process of its session behind. Returns stderr."""
    before = tree(*watch)
    with tempfile.TemporaryFile("w+") as err_file:  # not a pipe: a process left behind would hold it open
        p = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True, start_new_session=True
        )  # its own process group: what it started is findable
        try:
            p.wait(timeout=timeout)
        finally:
            left = [q for q in psutil.process_iter() if _alive_in(q, p.pid)]
            for q in left:
                q.kill()
        err_file.seek(0)
        err = err_file.read()
    _check(cmd, p.returncode, err, says)
    assert not left, f"{cmd}: left {len(left)} process(es) behind"
    assert tree(*watch) == before, f"{cmd}: changed files"
    return err


def _alive_in(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.Error):  # gone meanwhile
        return False
