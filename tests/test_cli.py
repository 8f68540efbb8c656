"""Every command-line tool turns a bad size, an absurd process count or an unwritable output into a usage
error (exit status 2, the option and the value named) before it spawns a process or does any work."""

import shutil
import subprocess

import pytest
import torch.multiprocessing

from lasp import cli
from tests.refusals import refuse_all


@pytest.fixture
def no_work(monkeypatch):
    """Any process spawned fails the test: the errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a process was started before the arguments were checked")

    monkeypatch.setattr(torch.multiprocessing, "spawn", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(cli, "cpu_cores", lambda: 2)


@pytest.fixture
def under_a_file(tmp_path):
    """A path whose parent is a regular file: no one can write there, root included."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


def usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
    return err


def test_the_checks_name_the_option_and_the_value(tmp_path, under_a_file, monkeypatch):
    monkeypatch.setattr(cli, "cpu_cores", lambda: 2)
    assert cli.at_least("--lengths", [4, 0, -1]) == ["--lengths must be >= 1, got 0", "--lengths must be >= 1, got -1"]
    assert cli.processes("--world-size", 512) == [
        "--world-size 512 is more processes than this machine can run (2 CPU cores; at most 8)"
    ]
    assert cli.processes("--world-size", 8) == [] and cli.processes("--world-size", 1, low=2) != []
    assert cli.sequence("--seq-len", 100, "zigzag", 4) == [
        "--seq-len 100: sequence length 100 cannot be split by the zigzag layout over 4 ranks: it needs a "
        "positive multiple of 8 tokens"
    ]
    assert cli.writable("--out", under_a_file) == [
        f"--out: cannot write to {under_a_file}: {under_a_file.parent} is not a directory"
    ]
    before = tmp_path.stat().st_mtime_ns
    assert cli.writable("--out", tmp_path / "new" / "deeper" / "x.jsonl") == []
    assert cli.writable("--out", tmp_path, directory=False) == [f"--out: cannot write to {tmp_path}: it is a directory"]
    assert not (tmp_path / "new").exists()  # checking by trying leaves nothing behind, not even a new mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and tmp_path.stat().st_mtime_ns == before
    # permission bits say yes here (os.access), the kernel says no: only trying tells
    assert cli.writable("--out", "/proc/lasp/x.jsonl") == [
        "--out: cannot write to /proc/lasp/x.jsonl: /proc is not writable (creating a directory in it failed: "
        "No such file or directory)"
    ]
    # every rank of a run checks the same new logging.run_dir at once: no check may meet another's probe
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: cli.writable("--out", tmp_path / "run" / "new", directory=True), range(400)))
    assert got == [[]] * 400 and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert cli.writable("--out", "/proc", directory=True)[0].startswith(
        "--out: cannot write to /proc: /proc is not writable"
    )


def test_demo(no_work, capsys):
    from lasp.demo import main

    refuse_all(
        main,
        [
            (["--world-size", "0"], "--world-size must be >= 1, got 0"),
            (["--world-size", "-1"], "--world-size must be >= 1, got -1"),
            (["--world-size", "two"], "argument --world-size: invalid int value: 'two'"),
            (
                ["--world-size", "512"],
                "--world-size 512 is more processes than this machine can run (2 CPU cores; at most 8)",
            ),
            (["--heads", "0"], "--heads must be >= 1, got 0"),
            (["--head-dim", "-4"], "--head-dim must be >= 1, got -4"),
            (["--seq-len", "0"], "--seq-len 0: sequence length 0 cannot be split by the zigzag layout over 2 ranks"),
            (["--world-size", "2", "--seq-len", "102"], "--seq-len 102: sequence length 102 cannot be split"),
            (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
            (["--device", "cuda"], "--world-size 2 needs one GPU per process; this machine has 0 GPU(s)"),
            (["--bogus"], "unrecognized arguments: --bogus"),
            (
                ["--world-size", "512", "--heads", "0", "--head-dim", "-4"],  # every problem at once
                "3 problems",
                "--world-size 512 is more processes",
                "--heads must be >= 1, got 0",
                "--head-dim must be >= 1",
            ),
        ],
        capsys,
    )


def test_mesh(capsys):
    from lasp.parallel.mesh import main

    err = usage_error(main, ["--tp", "0", "--sp", "-1", "--seq-len", "0", "--heads", "-2"], capsys)
    for part in (
        "--tp must be >= 1, got 0",
        "--sp must be >= 1, got -1",
        "--seq-len must be >= 1, got 0",
        "--heads must be >= 1, got -2",
    ):
        assert part in err
    err = usage_error(main, ["--tp", "3", "--sp", "2", "--seq-len", "90"], capsys)
    assert "model.num_heads (4) is not divisible by parallel.tp (3)" in err
    assert "sequence length 90 is not divisible by the zigzag layout over parallel.sp = 2 ranks" in err
    main(["--tp", "2", "--sp", "2"])
    assert "tp=2 sp=2 (zigzag) pp=1 dp=1: 4 ranks" in capsys.readouterr().out


def test_comm_table(no_work, under_a_file, capsys):
    from lasp.bench.comm_table import main

    assert "--world-size must be >= 2, got 1" in usage_error(main, ["--world-size", "1"], capsys)
    err = usage_error(main, ["--world-size", "512", "--out", str(under_a_file)], capsys)
    assert "--world-size 512 is more processes than this machine can run (2 CPU cores; at most 8)" in err
    assert f"--out: cannot write to {under_a_file}.jsonl: {under_a_file.parent} is not a directory" in err
    err = usage_error(main, ["--world-size", "3", "--seq-len", "96"], capsys)
    assert "--world-size 3: Ulysses needs the 8 heads divisible by the world size" in err
    assert "--seq-len" in usage_error(main, ["--world-size", "2", "--seq-len", "98"], capsys)


def test_cpu_linear_attn(no_work, under_a_file, capsys):
    from lasp.bench.cpu_linear_attn import main

    err = usage_error(main, ["--lengths", "64", "0", "--reps", "-1", "--out", str(under_a_file)], capsys)
    for part in ("--lengths must be >= 1, got 0", "--reps must be >= 1, got -1", "--out: cannot write to"):
        assert part in err


def test_kernels(no_work, under_a_file, tmp_path, capsys):
    from lasp.bench.kernels import main

    err = usage_error(main, ["--device", "cpu", "--batch", "0", "--heads", "-1", "--out", str(under_a_file)], capsys)
    for part in ("--batch must be >= 1, got 0", "--heads must be >= 1, got -1", "--out: cannot write to"):
        assert part in err
    err = usage_error(main, ["--from-jsonl", str(tmp_path / "gone.jsonl"), "--out", str(under_a_file)], capsys)
    assert f"--from-jsonl: {tmp_path / 'gone.jsonl'} does not exist" in err and "--out: cannot write to" in err


def test_loss_memory(no_work, under_a_file, capsys):
    from lasp.bench.loss_memory import main

    err = usage_error(main, ["--tokens", "0", "--chunk-tokens", "-1", "--out", str(under_a_file)], capsys)
    for part in ("--tokens must be >= 1, got 0", "--chunk-tokens must be >= 0, got -1", "--out: cannot write to"):
        assert part in err


def test_bench_train(no_work, under_a_file, tmp_path, capsys):
    from lasp.bench.train import main

    err = usage_error(
        main,
        ["--nprocs", "0", "512", "--steps", "-1", "--data", str(tmp_path / "none"), "--out", str(under_a_file)],
        capsys,
    )
    for part in (
        "--nprocs must be >= 1, got 0",
        "--steps must be >= 4, got -1",
        "--out: cannot write to",
        "--nprocs 512 is more processes than this machine can run (2 CPU cores; at most 8)",
        "with --nprocs 512: data.seq_len: sequence length 512 is not divisible by the zigzag layout",
        f"data.path: {tmp_path / 'none'} does not exist",
    ):
        assert part in err
    assert err.count("does not exist") == 1  # a problem of the config is not repeated per --nprocs
    assert "does not exist" in usage_error(main, ["--config", str(tmp_path / "no.yaml")], capsys)


def test_train(tmp_path, monkeypatch, capsys):
    from lasp.data import prepare
    from lasp.train.__main__ import main

    (tmp_path / "doc.txt").write_text("def f():\n    return 1\n" * 20)
    prepare([str(tmp_path / "doc.txt")], str(tmp_path / "data"), progress=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tmp_path / 'data'}\n  seq_len: 64\nlogging:\n  run_dir: {tmp_path / 'run'}\n")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "broken.yaml").write_text("data: [seq_len\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMMITTED").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "step-00000004").mkdir()  # a save still being written
    raw = (tmp_path / "data" / "train.bin").read_bytes()
    for name, tokens in (("short", raw[:-4]), ("changed", raw[::-1])):  # truncated; the same size, other bytes
        shutil.copytree(tmp_path / "data", tmp_path / name)
        (tmp_path / name / "train.bin").write_bytes(tokens)
    from lasp.model import LinearLlama, ModelConfig, save_pretrained

    other = {"name": "tokenizer.json", "vocab_size": 257, "eos_id": 0, "sha256": "ab" * 32}
    save_pretrained(LinearLlama(ModelConfig(vocab_size=257)), str(tmp_path / "export"), tokenizer=other)  # its ids
    c = ["--config", str(config)]
    refuse_all(
        main,
        [
            ([], "the following arguments are required: --config"),
            (["--config", str(tmp_path / "none.yaml")], f"config file: {tmp_path / 'none.yaml'} does not exist"),
            (["--config", str(tmp_path)], f"config file: {tmp_path} is a directory, not a file"),
            (["--config", str(tmp_path / "list.yaml")], "the top level must be a mapping of sections, got list"),
            (["--config", str(tmp_path / "broken.yaml")], "cannot read YAML"),
            (
                [*c, "--set", "optim.lr", "--set", "optim.lrr=1"],  # every problem at once
                "--set 'optim.lr': expected KEY=VALUE",
                "optim.lrr: unknown key (did you mean 'lr'?)",
            ),
            (
                [
                    *c,
                    "--set",
                    "data.seq_len=0",
                    "--set",
                    "parallel.sp=-1",
                    "--set",
                    f"logging.run_dir={tmp_path}/file/run",
                ],
                "data.seq_len must be >= 1, got 0",
                "parallel.sp must be >= 1, got -1",
                f"logging.run_dir: cannot write to {tmp_path}/file/run: {tmp_path}/file is not a directory",
            ),
            (
                [*c, "--set", f"data.path={tmp_path / 'file'}"],
                f"data.path: {tmp_path / 'file'} is a file, not a directory",
            ),
            (
                [*c, "--set", f"data.path={tmp_path / 'gone'}"],
                "does not exist; make a dataset with python -m lasp.data",
            ),
            (
                [*c, "--set", f"train.resume={tmp_path / 'run'}"],
                "is a run directory, not a checkpoint; its newest "
                f"committed checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}",
            ),
            (
                [*c, "--set", f"train.resume={tmp_path / 'run' / 'checkpoints' / 'step-00000004'}"],
                "has no COMMITTED marker: a save still being written, or one that did not finish",
            ),
            (
                [*c, "--set", "model.layer_pattern=LX"],
                "model.layer_pattern must be a non-empty string of L and S, got 'LX'",
            ),
            ([*c, "--world-size", "2"], "--world-size 2: only with --check-only"),
            ([*c, "--check-only", "--world-size", "0"], "--world-size: expected whole numbers >= 1"),
            ([*c, "--check-only", "--world-size", "3"], "world size 3 != tp x sp x pp x dp = 1 x 1 x 1 x 1 = 1"),
            ([*c, "--bogus"], "unrecognized arguments: --bogus"),
            ([*c, "--set", "train.trainable=new"], "train.trainable = new needs train.init_from"),
            ([*c, "--set", f"train.init_from={tmp_path / 'nowhere'}"], "train.init_from: cannot import"),
            (
                [*c, "--set", f"data.path={tmp_path / 'short'}"],
                f"data.path: {tmp_path / 'short' / 'train.bin'}: wrong size, expected {len(raw)} bytes",
            ),
            (
                [*c, "--set", f"data.path={tmp_path / 'changed'}"],
                f"data.path: {tmp_path / 'changed' / 'train.bin'}: checksum mismatch: sha256 ",
                "meta.json records ",
            ),
            (
                [*c, "--set", "model.vocab_size=257", "--set", f"train.init_from={tmp_path / 'export'}"],
                f"train.init_from {tmp_path / 'export'} was trained with tokenizer 'tokenizer.json' (vocab 257, EOS 0",
                f"but data.path {tmp_path / 'data'} has 'byte' (vocab 257, EOS 256)",
            ),
        ],
        capsys,
        watch=[tmp_path],
    )
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "512")  # as a launcher that started far too many ranks would say
    refuse_all(main, [(c, "world size 512 != tp x sp x pp x dp = 1 x 1 x 1 x 1 = 1")], capsys, watch=[tmp_path])


def test_data(tmp_path, under_a_file, capsys):
    from lasp.data.__main__ import main

    (tmp_path / "one.txt").write_text("a single document")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    run = tmp_path / "run"  # a run directory with a committed checkpoint: never prepare's to replace
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "COMMITTED").write_text("{}")
    (run / "metrics.jsonl").write_text("{}\n")
    one, out = ["--input", str(tmp_path / "one.txt")], ["--output", str(tmp_path / "out")]
    refuse_all(
        main,
        [
            (["prepare"], "the following arguments are required: --input, --output"),
            (["convert", *one, *out], "invalid choice: 'convert'"),
            (["prepare", "--input", str(tmp_path / "gone.txt"), *out], f"{tmp_path / 'gone.txt'}: no such file"),
            (
                ["prepare", "--input", str(tmp_path), *out],
                f"{tmp_path}: is a directory (give its files, e.g. a quoted glob",
            ),
            (["prepare", "--input", str(tmp_path / "*.md"), *out], "*.md: no file matches this pattern"),
            (["prepare", "--input", str(tmp_path / "empty.txt"), *out], "empty.txt: is empty"),
            (["prepare", "--input", str(tmp_path / "latin.txt"), *out], "latin.txt: not UTF-8"),
            (
                ["prepare", *one, "--output", str(under_a_file)],
                f"--output: cannot write to {under_a_file}: {under_a_file.parent} is not a directory",
            ),
            (
                ["prepare", *one, "--output", str(under_a_file.parent)],
                f"cannot write to {under_a_file.parent}: it is not a directory",
            ),
            (
                ["prepare", *one, "--output", str(tmp_path / "full")],
                f"--output: {tmp_path / 'full'} is not empty and has "
                "no meta.json (it holds keep.txt): --force replaces only a dataset made by lasp.data prepare",
            ),
            (
                ["prepare", *one, "--output", str(run), "--force"],
                f"{run} is not empty and has no meta.json (it holds "
                "checkpoints/, metrics.jsonl): --force replaces only a dataset",
            ),
            (
                [
                    "prepare",
                    "--input",
                    str(tmp_path / "full" / "keep.txt"),
                    "--output",
                    str(tmp_path / "full"),
                    "--force",
                ],
                f"{tmp_path / 'full'} holds the input {tmp_path / 'full' / 'keep.txt'}: "
                "a tool does not write over its own",
            ),
            (
                ["prepare", *one, "--output", str(tmp_path), "--force"],
                f"{tmp_path} holds the input {tmp_path / 'one.txt'}",
            ),
            (
                ["prepare", *one, "--output", "/proc/lasp-data"],
                "--output: cannot write to /proc/lasp-data: /proc is not writable (creating a directory in it failed",
            ),
            (
                ["prepare", *one, *out, "--val-fraction", "0.1"],
                "a val split needs at least 2 documents, the inputs have 1",
            ),
            (
                ["prepare", *one, *out, "--tokenizer", str(tmp_path / "tok.json")],
                "tok.json' does not exist (expected `byte`",
            ),
            (
                ["prepare", *one, *out, "--tokenizer", str(tmp_path / "full")],
                "full' is a directory without a tokenizer.json",
            ),
            (
                [
                    "prepare",
                    "--input",
                    str(tmp_path / "gone.txt"),
                    "--output",
                    str(under_a_file),
                    "--seed",
                    "-1",
                    "--val-fraction",
                    "1.5",
                ],  # every problem at once, no input read
                f"--output: cannot write to {under_a_file}",
                "--seed must be >= 0, got -1",
                "--val-fraction must be in [0, 1), got 1.5",
                f"--input {tmp_path / 'gone.txt'}: no such file",
            ),
        ],
        capsys,
        watch=[tmp_path],
    )
