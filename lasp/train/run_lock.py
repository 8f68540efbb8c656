"""A run directory belongs to one run: an exclusive lock held for the run's life.

The lock is `flock` on `<dir>/run.lock`, taken by rank 0 before anything in the directory is written or
removed. The kernel releases it when the process exits in any way (kill -9 included), so a lock is never
left held by a dead run; the file's text (host, pid, start time) says who holds it, and stays behind after
a crash, which is how a start recognises, and names, a run that ended without releasing it. A clean
release empties the file.

flock works across the nodes of a cluster on NFSv4 and Lustre (mounted with `flock`); on a filesystem
without it, taking the lock fails with the filesystem's error, named.
"""

import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = "run.lock"


class RunDirLocked(RuntimeError):
    """Another live run holds the directory's lock (the message names its host and pid)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """`acquire()` takes `<directory>/run.lock` or raises RunDirLocked; `release()` lets it go."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                text = f.read().strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> str | None:
        """Take the lock. Returns a note when the file names an earlier holder that ended without
        releasing it (a crash or kill -9), None otherwise."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self._holder()
            who = (
                f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}"
                if h
                else "a process that has not written its name yet"
            )
            raise RunDirLocked(
                f"{self.directory} is in use by another run ({who}; lock {self.path}): wait for it "
                "to finish or stop it, or give this run another logging.run_dir / "
                "checkpoint.dir"
            ) from None
        except OSError as e:
            os.close(fd)
            raise RunDirLocked(
                f"cannot lock {self.path}: {e.strerror or e} (the filesystem may not support flock; "
                "mount it with flock, or use a run directory on another filesystem)"
            ) from None
        stale = self._holder()
        note = None
        if stale:
            state = (
                "no longer running"
                if stale.get("host") == socket.gethostname()
                and isinstance(stale.get("pid"), int)
                and not _alive(stale["pid"])
                else "not holding it"
            )
            note = (
                f"{self.path}: the run of pid {stale.get('pid')} on host {stale.get('host')} (started "
                f"{stale.get('started')}) ended without releasing the lock ({state}: killed or crashed); "
                "taking it over"
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return note

    def release(self) -> None:
        """Empty the file (a clean end) and let the lock go; nothing if not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
