"""Checkpoint directories on disk: atomic commit, the manifest, discovery, validation and purging.

A checkpoint is a directory `step-00000100/` under checkpoint.dir. It is written as
`step-00000100.tmp/`; when every rank has finished writing, rank 0 writes `COMMITTED` (the manifest: each
file with its size and sha256) last, then renames the directory into place and fsyncs the parent. Only
directories named `step-N` that hold a `COMMITTED` are checkpoints, so a crash at any moment of a save
leaves either the previous checkpoints alone or a `.tmp` directory that is never read (and is removed by
the next save). Old checkpoints are purged only after the new one is committed; a purge removes
`COMMITTED` first, and never touches the checkpoint the run started from.

A load verifies every file's size and sha256 against the manifest (sha256: about 0.75 s per GB on one core
of this project's CI machine, OpenSSL's SHA extensions), so a checkpoint either loads exactly as saved or
is refused naming the damaged file. Manifests written before checksums hold sizes only.

A roll-back (resuming from a step older than the newest) moves the later steps of the abandoned branch
aside into `abandoned-<time>-from-step-N/`: kept, never read again, and a plain restart continues the new
branch.

Nothing here touches process groups: the caller decides which rank calls what.
"""

import json
import os
import re
import shutil
import time

from lasp.data.tokenizer import file_sha256

MARKER = "COMMITTED"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit this run (names the file)."""


def last_line(e: BaseException) -> str:
    """The line of an exception worth showing: DCP's own (CheckpointException) carries every rank's whole
    traceback, and its last line is what went wrong."""
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def tmp_dir(root: str, step: int) -> str:
    return step_dir(root, step) + ".tmp"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, text: str) -> None:
    """Write `text` durably: a temporary file, fsync, rename."""
    tmp = path + ".part"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _files(path: str) -> dict[str, int]:
    out = {}
    for base, _, names in os.walk(path):
        for n in names:
            full = os.path.join(base, n)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return out


def prepare(root: str, step: int) -> str:
    """Rank 0, before a save: a fresh, empty temporary directory for checkpoint `step`."""
    os.makedirs(root, exist_ok=True)
    tmp = tmp_dir(root, step)
    if os.path.exists(tmp):  # left by a save that crashed: it was never committed
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(root: str, step: int, keep_last: int, keep: str | None = None) -> str:
    """Rank 0, after every rank finished writing into tmp_dir(root, step): write the manifest (sizes and
    sha256 of every file) last, rename the directory into place, then purge all but the newest `keep_last`
    checkpoints, never `keep` (the checkpoint this run started from). Returns the path."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    files = _files(tmp)
    manifest = {
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        "sha256": {name: file_sha256(os.path.join(tmp, name)) for name in sorted(files)},
    }
    write_file(os.path.join(tmp, MARKER), json.dumps(manifest, indent=1))
    fsync_dir(tmp)
    if os.path.exists(final):  # a checkpoint of the same step from an earlier attempt: the new one wins
        old = f"{final}.replaced-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    keep = os.path.realpath(keep) if keep else None
    for _, path in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if os.path.realpath(path) != keep:
            _remove(path)
    for name in os.listdir(root):  # replaced or purged leftovers of a crash mid-removal
        if ".replaced-" in name:
            _remove(os.path.join(root, name))
    return final


def _remove(path: str) -> None:
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # first: a half-removed checkpoint must not look complete
    shutil.rmtree(path, ignore_errors=True)


def remove_unfinished(tmp: str) -> None:
    """Remove the temporary directory of a save that failed (only a `step-N.tmp`: what a save made)."""
    if os.path.basename(tmp).endswith(".tmp") and _NAME.match(os.path.basename(tmp)[:-4]):
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Committed checkpoints under `root` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


EXPORT_FILES = ("model.safetensors", "config.json")  # what lasp.export writes (lasp.model.pretrained)


def _step_name(name: str) -> bool:
    """`step-N` or its temporary `step-N.tmp`."""
    return bool(_NAME.match(name[:-4] if name.endswith(".tmp") else name))


def classify(path: str) -> tuple[str, str | None]:
    """What `path` is, as (kind, newest committed step under it or None). Kinds: "missing", "file" (not a
    directory), "step" (a committed checkpoint), "unfinished" (a step directory without its marker: a save
    in progress, or one a crash cut short), "export" (lasp.export's output), "run" (a run directory, with
    checkpoints/), "root" (a checkpoint.dir holding step directories), "other"."""
    if not os.path.exists(path):
        return "missing", None
    if not os.path.isdir(path):
        return "file", None
    if os.path.isfile(os.path.join(path, MARKER)):
        return "step", None
    if _step_name(os.path.basename(os.path.normpath(path))):
        return "unfinished", None
    if any(os.path.isfile(os.path.join(path, f)) for f in EXPORT_FILES):
        return "export", None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = list_checkpoints(os.path.join(path, "checkpoints"))
        return "run", found[-1][1] if found else None
    if any(_step_name(n) for n in os.listdir(path)):
        found = list_checkpoints(path)
        return "root", found[-1][1] if found else None
    return "other", None


def describe(path: str, exports: bool = False) -> str | None:
    """None when `path` is a committed checkpoint (or, with `exports`, an export); otherwise what it is
    instead, as the rest of a sentence that starts with the path, saying what to pass."""
    kind, newest = classify(path)
    use = f"; its newest committed checkpoint is {newest}" if newest else "; it holds no committed checkpoint yet"
    return {
        "missing": "does not exist",
        "file": "is a file, not a checkpoint directory",
        "step": None,
        "unfinished": f"has no {MARKER} marker: a save still being written, or one that did not finish (a crash "
        "during the save); pass a committed step directory",
        "export": None if exports else "is an export (lasp.export's model.safetensors), not a trainer checkpoint",
        "run": f"is a run directory, not a checkpoint{use}",
        "root": f"is a directory of checkpoints, not one checkpoint{use}",
        "other": "is not a checkpoint: it has no "
        + MARKER
        + " marker"
        + ("" if not exports else " and no model.safetensors (not an export either)"),
    }[kind]


def verify(path: str, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> dict:
    """The manifest of checkpoint `path` after checking that every file it lists is there with its size
    and, with `checksums`, its sha256. `part` = (i, n): hash only every n-th file from the i-th (sorted by
    name), so n ranks share the reading; sizes are always checked in full. Raises CheckpointError naming
    every damaged file and what is wrong."""
    marker = os.path.join(path, MARKER)
    what = describe(path)
    if what is not None:
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        with open(marker) as f:
            manifest = json.load(f)
        files, sums = manifest["files"], manifest.get("sha256") or {}
        if not isinstance(files, dict) or not isinstance(sums, dict):
            raise TypeError("files and sha256 must be mappings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker} is unreadable ({e!r})") from None
    problems = []
    for i, (name, size) in enumerate(sorted(files.items())):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{full} is missing")
        elif os.path.getsize(full) != size:
            problems.append(
                f"{full} has {os.path.getsize(full)} bytes, the manifest says {size} (truncated or overwritten)"
            )
        elif checksums and name in sums and i % part[1] == part[0]:
            try:
                digest = file_sha256(full)
            except OSError as e:
                problems.append(f"{full} cannot be read ({e.strerror or e})")
                continue
            if digest != sums[name]:
                problems.append(
                    f"{full} has sha256 {digest[:16]}..., the manifest says {sums[name][:16]}... (its "
                    "bytes changed after the save: disk or copy damage)"
                )
    if problems:
        hint = (
            "\n  (use an earlier checkpoint; checkpoint.verify=false skips the sha256 check, at your risk)"
            if any("sha256" in p for p in problems)
            else ""
        )
        raise CheckpointError(f"checkpoint {path} is damaged:\n  " + "\n  ".join(problems) + hint)
    return manifest


def read_state(path: str) -> dict:
    """The train_state.json of a verified checkpoint."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def resolve_resume(resume: str, root: str, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> str | None:
    """`train.resume` -> the checkpoint to load, or None for a fresh start.

    never: None (an error if `root` already holds checkpoints: a fresh run would mix its checkpoints
    with theirs). auto: the newest committed checkpoint under `root`, or None when there is none.
    Anything else is the path of one checkpoint. The chosen checkpoint is verified (CheckpointError;
    `checksums` and `part` as in `verify`)."""
    found = list_checkpoints(root)
    if resume == "never":
        if found:
            raise CheckpointError(
                f"train.resume = never, but {root} holds checkpoints of an earlier run (newest: "
                f"{found[-1][1]}); use train.resume=auto to continue it, or another "
                "checkpoint.dir / logging.run_dir"
            )
        return None
    if resume == "auto":
        if not found:
            return None
        path = found[-1][1]
    else:
        path = resume
    verify(path, checksums, part)
    return path


def later_steps(root: str, step: int) -> list[str]:
    """Step directories under `root` (committed or not) beyond `step`: after a roll-back to `step`, the
    branch it abandons."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        m = _NAME.match(name[:-4] if name.endswith(".tmp") else name)
        if m and int(m.group(1)) > step:
            out.append(os.path.join(root, name))
    return out


def set_aside(root: str, step: int) -> tuple[str, list[str]] | None:
    """Rank 0, when a run starts from checkpoint `step` and `root` holds later steps (a roll-back): move
    them into `root/abandoned-<time>-from-step-<step>/` (kept, never read again: the next save and a plain
    restart continue the new branch). Returns (that directory, the names moved), or None if nothing was
    later."""
    later = later_steps(root, step)
    if not later:
        return None
    aside = os.path.join(root, f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-from-step-{step:08d}")
    n = 1
    while os.path.exists(aside + ("" if n == 1 else f"-{n}")):
        n += 1
    aside += "" if n == 1 else f"-{n}"
    os.makedirs(aside)
    for path in later:
        os.rename(path, os.path.join(aside, os.path.basename(path)))
    fsync_dir(aside)
    fsync_dir(root)
    return aside, [os.path.basename(p) for p in later]
