"""Every command-line tool turns a bad size, an absurd process count or an unwritable output into a usage
error (exit status 2, the option and the value named) before it spawns a process or does any work."""

import subprocess

import pytest
import torch.multiprocessing

from lasp import cli


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
        "--world-size 512 is more processes than this machine can run (2 CPU cores; at most 8)"]
    assert cli.processes("--world-size", 8) == [] and cli.processes("--world-size", 1, low=2) != []
    assert cli.sequence("--seq-len", 100, "zigzag", 4) == [
        "--seq-len 100: sequence length 100 cannot be split by the zigzag layout over 4 ranks: it needs a "
        "positive multiple of 8 tokens"]
    assert cli.writable("--out", under_a_file) == [
        f"--out: cannot write to {under_a_file}: {under_a_file.parent} is not a directory"]
    assert cli.writable("--out", tmp_path / "new" / "deeper" / "x.jsonl") == []
    assert cli.writable("--out", tmp_path, directory=False) == [f"--out: cannot write to {tmp_path}: it is a directory"]
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_demo(no_work, capsys):
    from lasp.demo import main

    for bad in ("0", "-1"):
        assert f"--world-size must be >= 1, got {bad}" in usage_error(main, ["--world-size", bad], capsys)
    err = usage_error(main, ["--world-size", "512", "--heads", "0"], capsys)
    assert "--world-size 512 is more processes than this machine can run (2 CPU cores; at most 8)" in err
    assert "--heads must be >= 1, got 0" in err
    err = usage_error(main, ["--world-size", "2", "--seq-len", "102", "--head-dim", "-4"], capsys)
    assert "--seq-len 102: sequence length 102 cannot be split by the zigzag layout over 2 ranks" in err
    assert "--head-dim must be >= 1, got -4" in err


def test_mesh(capsys):
    from lasp.parallel.mesh import main

    err = usage_error(main, ["--tp", "0", "--sp", "-1", "--seq-len", "0", "--heads", "-2"], capsys)
    for part in ("--tp must be >= 1, got 0", "--sp must be >= 1, got -1", "--seq-len must be >= 1, got 0",
                 "--heads must be >= 1, got -2"):
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
    assert f"--from-jsonl: {tmp_path / 'gone.jsonl'} is not a file" in err and "--out: cannot write to" in err


def test_loss_memory(no_work, under_a_file, capsys):
    from lasp.bench.loss_memory import main

    err = usage_error(main, ["--tokens", "0", "--chunk-tokens", "-1", "--out", str(under_a_file)], capsys)
    for part in ("--tokens must be >= 1, got 0", "--chunk-tokens must be >= 0, got -1", "--out: cannot write to"):
        assert part in err


def test_bench_train(no_work, under_a_file, tmp_path, capsys):
    from lasp.bench.train import main

    err = usage_error(main, ["--nprocs", "0", "512", "--steps", "-1", "--data", str(tmp_path / "none"),
                             "--out", str(under_a_file)], capsys)
    for part in ("--nprocs must be >= 1, got 0", "--steps must be >= 4, got -1", "--out: cannot write to",
                 "--nprocs 512 is more processes than this machine can run (2 CPU cores; at most 8)",
                 "with --nprocs 512: data.seq_len: sequence length 512 is not divisible by the zigzag layout",
                 "is not a prepared dataset"):
        assert part in err
    assert err.count("is not a prepared dataset") == 1  # a problem of the config is not repeated per --nprocs
    assert "does not exist" in usage_error(main, ["--config", str(tmp_path / "no.yaml")], capsys)


def test_train(tmp_path, monkeypatch, capsys):
    from lasp.train.__main__ import main

    config = tmp_path / "c.yaml"
    config.write_text("data:\n  seq_len: 64\n")
    (tmp_path / "file").write_text("")
    bad = ["--set", "data.seq_len=0", "--set", "parallel.sp=-1", "--set", f"logging.run_dir={tmp_path}/file/run"]
    assert main(["--config", str(config), *bad]) == 2
    err = capsys.readouterr().err
    for part in ("data.seq_len must be >= 1, got 0", "parallel.sp must be >= 1, got -1",
                 f"logging.run_dir: cannot write to {tmp_path}/file/run: {tmp_path}/file is not a directory"):
        assert part in err
    assert "Traceback" not in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "512")  # as a launcher that started far too many ranks would say
    assert main(["--config", str(config)]) == 2
    assert "world size 512 != tp x sp x pp x dp = 1 x 1 x 1 x 1 = 1" in capsys.readouterr().err


def test_data(tmp_path, under_a_file, capsys):
    from lasp.data.__main__ import main

    argv = ["prepare", "--input", str(tmp_path / "gone.txt"), "--output", str(under_a_file), "--seed", "-1",
            "--val-fraction", "1.5"]
    err = usage_error(main, argv, capsys)
    for part in (f"--output: cannot write to {under_a_file}: {under_a_file.parent} is not a directory",
                 "--seed must be >= 0, got -1", "--val-fraction must be in [0, 1), got 1.5"):
        assert part in err
    assert f"--input {tmp_path / 'gone.txt'}: no such file" in err  # every problem at once; no input read
    err = usage_error(main, ["prepare", "--input", "x", "--output", str(under_a_file.parent)], capsys)
    assert f"cannot write to {under_a_file.parent}: it is not a directory" in err
