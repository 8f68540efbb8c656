"""LASP-2, Ulysses and the Ring baselines on W gloo processes reproduce single-process linear attention
exactly (LASP-1 and the other ways of combining the states, with every form: test_sp_methods.py).

Every case runs on all ranks of a DistPool: each rank builds the full inputs from one seed, computes the
single-process reference with `linear_attn`, runs the SP op on its shard under the profiler, and
compares its shard of the output and of the q, k, v gradients. The test then counts the communication.
"""

import pytest
import torch
import torch.distributed as dist

from lasp import SeqLayout, lasp2_linear_attn, linear_attn, ring_linear_attn, shard_sequence, ulysses_linear_attn
from lasp.distributed.agree import HEADER_BYTES
from tests.dist import assert_close_rel, comm_events, profiled_steady_step

ALGOS = {
    "lasp2": lasp2_linear_attn,
    "ulysses": lambda *a, kernel=None, **kw: ulysses_linear_attn(*a, **kw),
    "ring_right": lambda *a, kernel=None, **kw: ring_linear_attn(*a, form="right", **kw),
    "ring_quadratic": lambda *a, kernel=None, **kw: ring_linear_attn(*a, form="quadratic", **kw),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
TOL = {"f64": 1e-10, "f32": 1e-5}
MODES = {"causal": (True, False), "decay": (True, True), "bidirectional": (False, False)}


def case_sp_linear(
    algo, layout, mode, dtype, chunk_len, B=2, H=4, Hkv=2, K=6, V=5, block=8, backend="torch", check_ranks=True
):
    from lasp.kernels import TorchChunkKernel

    rank, W = dist.get_rank(), dist.get_world_size()
    causal, with_decay = MODES[mode]
    dt = DTYPES[dtype]
    N = chunk_len * SeqLayout(layout, W).num_chunks
    gen = torch.Generator().manual_seed(1234)
    q, k, v, do = (
        torch.randn(*s, generator=gen, dtype=dt) for s in [(B, N, H, K), (B, N, Hkv, K), (B, N, Hkv, V), (B, N, H, V)]
    )
    log_decay = -torch.linspace(0.02, 0.9, H, dtype=dt) if with_decay else None
    if backend == "triton":  # the pool was started with TRITON_INTERPRET=1 (or on a GPU)
        from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

        kernel = TritonChunkKernel(block=16)
    else:
        kernel = TorchChunkKernel(block=block, segment_blocks=2)

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = linear_attn(*full, log_decay=log_decay, causal=causal, kernel=kernel)
    o_ref.backward(do)

    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    local = [shard(x).requires_grad_() for x in (q, k, v)]
    run = lambda: ALGOS[algo](
        *local,
        layout=layout,
        log_decay=log_decay,
        causal=causal,
        kernel=kernel,  # noqa: E731
        check_ranks=check_ranks,
    )
    o, pf, pb = profiled_steady_step(run, shard(do))

    assert_close_rel(o, shard(o_ref), TOL[dtype], "o")
    for name, got, ref in zip("qkv", local, full):
        assert_close_rel(got.grad, shard(ref.grad), TOL[dtype], f"d{name}")
    return {"fwd": comm_events(pf), "bwd": comm_events(pb)}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("algo", ["lasp2", "ulysses"])  # LASP-1 and the other combiners: test_sp_methods.py
def test_sp_linear_matches_single_process(dist_pool, algo, W, layout, mode, dtype):
    """LASP-2: one all-gather of the [n, B, H, K, V] states each way, no T in it. Ulysses (12 query heads,
    3 KV heads: W must divide them): four all-to-alls each way (q, k, v there, o back; their gradients)
    after the rank check's all-gather."""
    ulysses = algo == "ulysses"
    chunk_len = 13 if W % 2 or ulysses else 37
    results = dist_pool(W).run(
        "tests.test_sp_linear:case_sp_linear",
        algo=algo,
        layout=layout,
        mode=mode,
        dtype=dtype,
        chunk_len=chunk_len,
        **(dict(H=12, Hkv=3) if ulysses else {}),
    )
    n = SeqLayout(layout, W).chunks_per_rank
    # [n, B, H, K, V] states, no T in it, as bytes after the rank agreement header
    message = [HEADER_BYTES + n * 2 * 4 * 6 * 5 * (8 if dtype == "f64" else 4)]
    for r in results:
        if W == 1:
            assert r["fwd"] == [] and r["bwd"] == [], r
        elif ulysses:
            assert sorted(e[0] for e in r["fwd"]) == ["gloo:all_gather"] + ["gloo:all_to_all"] * 4, r["fwd"]
            assert [e[0] for e in r["bwd"]] == ["gloo:all_to_all"] * 4, r["bwd"]
        else:
            assert r["fwd"] == [("gloo:all_gather", [message])], r["fwd"]
            assert r["bwd"] == [("gloo:all_gather", [message])], r["bwd"]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("form", ["right", "quadratic"])
def test_ring_linear_matches_single_process(dist_pool, form, W, layout, mode):
    """The Ring baseline for linear attention, both forms: K/V (with H heads after GQA) go round, W-1
    hops forward, W-1 back; plus its one rank-check all-gather."""
    res = dist_pool(W).run(
        "tests.test_sp_linear:case_sp_linear", algo=f"ring_{form}", layout=layout, mode=mode, dtype="f64", chunk_len=7
    )
    for r in res:
        assert r["fwd"][0][0] == "gloo:all_gather"
        for phase, events in (("fwd", r["fwd"][1:]), ("bwd", r["bwd"])):
            names = [name for name, _ in events]
            assert names.count("gloo:recv") == W - 1 and set(names) <= {"gloo:send", "gloo:recv"}, (phase, names)


def test_lasp2_bytes_do_not_depend_on_length(dist_pool):
    pool = dist_pool(2)
    short, long = (
        pool.run(
            "tests.test_sp_linear:case_sp_linear", algo="lasp2", layout="zigzag", mode="decay", dtype="f32", chunk_len=n
        )
        for n in (5, 150)
    )
    assert [r["fwd"] for r in short] == [r["fwd"] for r in long]
    assert [r["bwd"] for r in short] == [r["bwd"] for r in long]


def test_lasp2_without_rank_checks_gathers_the_bare_states(dist_pool):
    res = dist_pool(3).run(
        "tests.test_sp_linear:case_sp_linear",
        algo="lasp2",
        layout="zigzag",
        mode="decay",
        dtype="f32",
        chunk_len=5,
        check_ranks=False,
    )
    for r in res:
        assert r["fwd"] == r["bwd"] == [("gloo:all_gather", [[2, 2, 4, 6, 5]])], r


def case_bad_local_length():
    q = torch.randn(1, 7, 2, 4)
    try:
        lasp2_linear_attn(q, q, q, layout="zigzag")
    except ValueError as e:
        return str(e)
    return "no error"


def test_lasp2_rejects_a_length_the_layout_cannot_split(dist_pool):
    msgs = dist_pool(2).run("tests.test_sp_linear:case_bad_local_length")
    assert all("local length 7 (sequence length 14)" in m and "zigzag" in m and "2 ranks" in m for m in msgs)


def test_without_process_group_it_is_linear_attn():
    assert not dist.is_initialized()
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64) for _ in range(3))
    for fn in ALGOS.values():
        torch.testing.assert_close(fn(q, k, v, layout="zigzag"), linear_attn(q, k, v), atol=0, rtol=0)
