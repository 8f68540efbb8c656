"""The scaling benchmark (lasp.bench.sp): its cost model by hand, its counted messages, the simulation's
shapes against a distributed run's, and the whole CPU sweep at a tiny size."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from lasp.bench.sp.methods import METHODS, Case, measure
from lasp.sp.cost import Compute, Link, Message, Shape, collective_time, fit_link, layer_time, plan


def test_alpha_beta_by_hand():
    link = Link("hand", alpha_s=10e-6, busbw_bytes_per_s=100e9, overlap=1.0)
    S = 8 * 2**20
    # ring all-gather of 8 MiB over 4 ranks: 3 steps of 10 us + 3/4 of 8 MiB at 100 GB/s
    assert collective_time(Message("all_gather", S), 4, link) == pytest.approx(3 * 10e-6 + 0.75 * S / 100e9)
    assert collective_time(Message("all_reduce", S), 4, link) == pytest.approx(6 * 10e-6 + 1.5 * S / 100e9)
    assert collective_time(Message("p2p", S), 4, link) == pytest.approx(10e-6 + S / 100e9)
    assert collective_time(Message("all_gather", S), 1, link) == 0.0
    # LASP-2, W=4, zigzag, B=1, H=16, K=V=128, bf16: the states are float32, 2 chunks per rank
    s = Shape(W=4, B=1, T=8192, H=16, Hkv=16, K=128, V=128, layout="zigzag", itemsize=2)
    ag = 4 * 2 * 16 * 128 * 128 * 4  # 8 MiB in all
    assert [(m.kind, m.nbytes, m.hidden) for m in plan("lasp2", s).fwd] == [("all_gather", ag, True)]
    comm = 3 * 10e-6 + 0.75 * ag / 100e9  # 93 us
    # forward: 1 ms of compute, 50 us of it overlapping the all-gather: 43 us stay exposed
    t = layer_time("lasp2", s, Compute(fwd=1e-3, bwd=2e-3, fwd_overlap=50e-6, bwd_overlap=200e-6), link)
    assert t["fwd"] == pytest.approx(1e-3 + comm - 50e-6)
    assert t["bwd"] == pytest.approx(2e-3)  # hidden entirely
    # Ring: W-1 hops of the local K/V forward; backward W-1 hops of K/V + accumulators (float32), then one
    kv = 1 * 8192 * 16 * 256
    r = plan("ring", s)
    assert [m.nbytes for m in r.fwd] == [kv * 2] * 3 and [m.nbytes for m in r.bwd] == [2 * kv * 4] * 3 + [kv * 4]


def test_fit_recovers_alpha_and_beta():
    truth = Link("t", 50e-6, 2e9)
    samples = [
        (k, W, n, collective_time(Message(k, n), W, truth))
        for k in ("all_gather", "p2p", "all_to_all")
        for W in (2, 4)
        for n in (4 << 10, 1 << 20, 8 << 20)
    ]
    got = fit_link(samples)
    assert got.alpha_s == pytest.approx(50e-6, rel=1e-6) and got.busbw_bytes_per_s == pytest.approx(2e9, rel=1e-6)
    with pytest.raises(ValueError, match="at least two sizes"):
        fit_link(samples[:1])


def _simulated(method: str, W: int, N: int, **kw) -> list[dict]:
    from lasp.bench.sp.simulate import simulate

    assert not dist.is_initialized()
    return simulate(Case(method, W, N, **kw), reps=1)


@pytest.mark.slow
def test_counted_messages_follow_the_algorithms():
    for method in METHODS:  # every rank's counted messages are the cost model's plan (LASP-1: its share)
        rows = _simulated(method, 4, 256)
        p = plan(method, Shape(4, 1, 64, 8, 2, 64, 64, "zigzag", 4))
        for r in rows:
            got = sorted((m["kind"], m["nbytes"]) for m in r["fwd_messages"])
            want = sorted(
                (
                    m.kind.removesuffix("_round"),
                    m.nbytes + (512 if m.kind == "all_gather" and method in ("lasp2", "lasp2h") else 0) * 4,
                )
                for m in p.fwd
            )
            if method == "lasp1":
                continue
            if method not in ("lasp2", "lasp2h"):  # + the one rank-check all-gather, 512 B a rank
                want = sorted(want + [("all_gather", 4 * 512)])
            assert got == want, (method, got, want)
    # LASP-2's bytes do not depend on N; Ring's grow with it; LASP-1 makes 2(W-1) hops in all (zigzag)
    lasp2 = [sum(m["nbytes"] for r in _simulated("lasp2", 4, N) for m in r["fwd_messages"]) for N in (256, 1024)]
    ring = [sum(m["nbytes"] for r in _simulated("ring", 4, N) for m in r["fwd_messages"]) for N in (256, 1024)]
    assert lasp2[0] == lasp2[1] and ring[1] > 3 * ring[0]
    hops = sum(1 for r in _simulated("lasp1", 4, 256) for m in r["fwd_messages"] if m["kind"] == "p2p")
    assert hops == 2 * (4 - 1)


@pytest.mark.slow
def test_peak_memory_is_the_allocators_running_peak():
    import torch

    from lasp.bench.sp.methods import peak_allocated

    def profile():
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    with profile() as a:
        x = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, kept
        y = torch.empty(3 << 20, dtype=torch.uint8)  # 3 MiB, freed
        del y
    with profile() as b:
        z = torch.empty(2 << 20, dtype=torch.uint8)  # 2 MiB on top of the 4 MiB still live
        del z
    assert peak_allocated(a) == 7 << 20 and peak_allocated(a, b) == 7 << 20
    assert peak_allocated(b) == 2 << 20
    del x
    # a layer's peak grows with its local length; the quadratic form's as the square
    peak = {
        (m, N): max(r["peak_mem_gib"] for r in _simulated(m, 2, N))
        for m in ("lasp2", "ring_linear_quadratic")
        for N in (512, 2048)
    }
    assert 2.5 < peak["lasp2", 2048] / peak["lasp2", 512] < 6
    assert peak["ring_linear_quadratic", 2048] / peak["ring_linear_quadratic", 512] > 8


def case_compute_shapes(method: str, N: int) -> list:
    rank, W = dist.get_rank(), dist.get_world_size()
    return measure(Case(method, W, N), None, rank, 1, check_ranks=True)["compute_shapes"]


@pytest.mark.parametrize("method", ["lasp2", "ring", "ulysses"])
def test_simulation_computes_what_the_distributed_run_computes(dist_pool, method):
    dist_rows = dist_pool(2).run("tests.test_bench_sp:case_compute_shapes", method=method, N=128)
    sim = _simulated(method, 2, 128)
    assert [r["compute_shapes"] for r in sim] == dist_rows
    assert all(len(s) > 0 for s in dist_rows)


@pytest.mark.slow
def test_the_cpu_sweep_writes_its_files_and_plots(tmp_path):
    out = tmp_path / "sp"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasp.bench.sp",
            "cpu",
            "--world-sizes",
            "1",
            "2",
            "--seq-lens",
            "96",
            "--tokens-per-rank",
            "24",
            "--reps",
            "1",
            "--methods",
            "lasp2",
            "lasp1",
            "ring",
            "ulysses",
            "--heads",
            "3",
            "--kv-heads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"},  # as a person runs it
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "USDT" not in run.stdout + run.stderr and "profiler_start" not in run.stderr  # the profiler is quiet
    for name in (
        "measured.jsonl",
        "measured.csv",
        "calibration.jsonl",
        "simulated.jsonl",
        "simulated.csv",
        "validation.jsonl",
        "validation.csv",
        "tokens_vs_N.png",
        "tokens_vs_W.png",
        "bytes_vs_W.png",
        "memory_vs_N.png",
        "validation.png",
    ):
        assert (out / name).stat().st_size > 0, name
    measured = [json.loads(x) for x in (out / "measured.jsonl").read_text().splitlines()]
    skipped = [r for r in measured if "skipped" in r]
    assert skipped and all("Ulysses needs heads % W == 0: 3 heads, W=2" in r["skipped"] for r in skipped)
    assert {r["W"] for r in measured} == {1, 2} and all("git" in r and "torch" in r for r in measured)
    assert {(r["W"], r["dp"]) for r in measured if r["method"] == "hybrid_train_step"} == {(1, 2), (2, 1)}
    assert "median |error|" in run.stdout and "| lasp2 | 2 |" in run.stdout


def test_predicted_steps_add_compute_and_the_exposed_messages():
    from lasp.bench.sp.predict import step
    from lasp.model.config import ModelConfig
    from lasp.train.flops import flops_per_token

    m = ModelConfig(
        vocab_size=1000,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        ffn_hidden_size=512,
        layer_pattern="LLLS",
    )
    link = Link("hand", 10e-6, 100e9)
    got = step(m, "lasp2", 8, 8192, link, tflops=100.0)
    assert got["compute_s"] == pytest.approx(flops_per_token(m, 8192) * 1024 / 100e12)
    state_ag = collective_time(Message("all_gather", 8 * 2 * 4 * 64 * 64 * 4), 8, link)  # 3 LASP-2 layers
    kv_ag = collective_time(Message("all_gather", 8 * 1024 * 4 * 128 * 2), 8, link)  # 1 LASP-2H layer, bf16
    assert got["comm_s"] == pytest.approx(3 * 2 * state_ag + 2 * kv_ag)
    assert got["tokens_per_s"] == pytest.approx(8192 / (got["compute_s"] + got["comm_s"]))


@pytest.mark.slow
def test_the_prediction_sweep_writes_its_rows_and_plot(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasp.bench.sp",
            "predict",
            "--world-sizes",
            "16",
            "64",
            "--seq-lens",
            "65536",
            "2097152",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MODELLED" in run.stdout and "| 64 | 2097152 |" in run.stdout
    rows = [json.loads(x) for x in (tmp_path / "predicted.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"lasp2", "lasp1", "ulysses", "ring"} and all(
        r.get("modelled") or r.get("skipped") for r in rows
    )
    assert (tmp_path / "predicted_W64.png").stat().st_size > 0


@pytest.mark.slow
def test_the_gated_benchmark_writes_its_rows(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "lasp.bench.gated", "--lengths", "96", "--reps", "1", "--out", str(tmp_path / "gated")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "gated.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r.get("kind") != "gathered_bytes"]
    assert [r["form"] for r in timed] == [
        "decay",
        "scalar",
        "vector",
        "decay-docs",
        "scalar-docs",
        "deltanet",
        "gdn",
        "kda",
        "deltaproduct",
        "mom",
    ] and timed[0]["over_decay"] == 1.0
    assert all(r["peak_bytes"] > 0 for r in timed)
    for line in ("scalar at T=96: ", "vector at T=96: ", "gdn at T=96: ", "the peak memory of scalar"):
        assert line in run.stdout, line
    sizes = [r for r in rows if r.get("kind") == "gathered_bytes"]  # LASP-2's pairs against the cost model
    assert [r["W"] for r in sizes] == [8, 16, 32, 64, 128] and all(r["bytes_built"] == r["bytes_model"] for r in sizes)
