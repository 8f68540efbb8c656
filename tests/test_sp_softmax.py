"""LASP-2H, Ring Attention and Ulysses (softmax and linear) on W gloo processes reproduce one process.

Each rank builds the full inputs from one seed, computes the single-process reference, runs the SP op on
its shard under the profiler and compares its shards of the output and of the q, k, v gradients.
"""

import pytest
import torch
import torch.distributed as dist

from lasp import (
    SeqLayout,
    lasp2h_softmax_attn,
    linear_attn,
    ring_softmax_attn,
    shard_sequence,
    softmax_attn,
    ulysses_linear_attn,
    ulysses_softmax_attn,
)
from tests.dist import assert_close_rel, c10d_ops

SOFTMAX = {"lasp2h": lasp2h_softmax_attn, "ring": ring_softmax_attn, "ulysses": ulysses_softmax_attn}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
TOL = {"f64": 1e-10, "f32": 1e-5}
HEADS = {"mha": (12, 12), "gqa2": (12, 6), "gqa4": (12, 3), "mqa": (12, 1)}


def _profiled(fn, *args, **kwargs):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn(*args, **kwargs)
    return out, prof


def case_sp_attn(algo, layout, causal, dtype, heads, chunk_len, decay=False, B=2, D=4, Dv=3):
    rank, W = dist.get_rank(), dist.get_world_size()
    dt, (Hq, Hkv) = DTYPES[dtype], HEADS[heads]
    N = chunk_len * SeqLayout(layout, W).num_chunks
    gen = torch.Generator().manual_seed(4321)
    shapes = [(B, N, Hq, D), (B, N, Hkv, D), (B, N, Hkv, Dv), (B, N, Hq, Dv)]
    q, k, v, do = (torch.randn(*s, generator=gen, dtype=dt) for s in shapes)
    if algo == "ulysses_linear":
        log_decay = -torch.linspace(0.05, 0.8, Hq, dtype=dt) if decay else None
        ref_fn = lambda q, k, v: linear_attn(q, k, v, log_decay=log_decay, causal=causal)  # noqa: E731
        sp_fn = lambda q, k, v: ulysses_linear_attn(q, k, v, layout=layout, log_decay=log_decay, causal=causal)  # noqa: E731
    else:
        ref_fn = lambda q, k, v: softmax_attn(q, k, v, causal=causal)  # noqa: E731
        sp_fn = lambda q, k, v: SOFTMAX[algo](q, k, v, layout=layout, causal=causal)  # noqa: E731

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = ref_fn(*full)
    o_ref.backward(do)
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    local = [shard(x).requires_grad_() for x in (q, k, v)]
    with torch.no_grad():
        sp_fn(*local)  # the first call of a new size announces it (lasp.distributed.agree): count a steady call
    o, pf = _profiled(sp_fn, *local)
    _, pb = _profiled(o.backward, shard(do))

    assert o.dtype == dt
    assert_close_rel(o, shard(o_ref), TOL[dtype], "o")
    for name, got, ref in zip("qkv", local, full):
        assert_close_rel(got.grad, shard(ref.grad), TOL[dtype], f"d{name}")
    sdpa = [e.input_shapes for e in pf.events() if e.name == "aten::scaled_dot_product_attention"]
    # SDPA takes [B, H, T, D]: record (query length, key length) of every call
    return {"fwd": c10d_ops(pf), "bwd": c10d_ops(pb), "sdpa_q_k": [(s[0][2], s[1][2]) for s in sdpa]}


FINGERPRINTS = ["c10d::_allgather_base_"]  # ops whose collectives carry no header exchange one per call
EXPECTED = {
    "lasp2h": lambda W: (["c10d::_allgather_base_"], ["c10d::_reduce_scatter_base_"]),
    "ring": lambda W: (FINGERPRINTS + ["c10d::send", "c10d::recv_"] * (W - 1), ["c10d::send", "c10d::recv_"] * W),
    "ulysses": lambda W: (FINGERPRINTS + ["c10d::alltoall_base_"] * 4, ["c10d::alltoall_base_"] * 4),
    "ulysses_linear": lambda W: (FINGERPRINTS + ["c10d::alltoall_base_"] * 4, ["c10d::alltoall_base_"] * 4),
}


def _check(results, algo, W):
    fwd, bwd = EXPECTED[algo](W) if W > 1 else ([], [])
    for r in results:
        assert sorted(r["fwd"]) == sorted(fwd), r["fwd"]
        assert sorted(r["bwd"]) == sorted(bwd), r["bwd"]


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("algo", list(SOFTMAX))
def test_softmax_sp_matches_single_process_f64(dist_pool, algo, W, layout, causal, heads):
    chunk_len = 13 if W % 2 else 7
    res = dist_pool(W).run(
        "tests.test_sp_softmax:case_sp_attn",
        algo=algo, layout=layout, causal=causal, dtype="f64", heads=heads, chunk_len=chunk_len,
    )
    _check(res, algo, W)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("algo", list(SOFTMAX))
def test_softmax_sp_matches_single_process_f32(dist_pool, algo, W, layout, causal):
    res = dist_pool(W).run(
        "tests.test_sp_softmax:case_sp_attn",
        algo=algo, layout=layout, causal=causal, dtype="f32", heads="gqa4", chunk_len=37,
    )
    _check(res, algo, W)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["causal", "decay", "bidirectional"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_ulysses_linear_matches_single_process(dist_pool, W, layout, mode, dtype):
    res = dist_pool(W).run(
        "tests.test_sp_softmax:case_sp_attn",
        algo="ulysses_linear", layout=layout, causal=mode != "bidirectional", decay=mode == "decay",
        dtype=dtype, heads="gqa4", chunk_len=13,
    )
    _check(res, "ulysses_linear", W)


@pytest.mark.parametrize("W", [2, 4])
def test_lasp2h_zigzag_balances_causal_work(dist_pool, W):
    """Score entries each rank's SDPA calls attend (causal, end-aligned: L*(S-L) + L(L+1)/2 per call)."""
    L = 40

    def work(results):
        return [sum(lq * (sk - lq) + lq * (lq + 1) // 2 for lq, sk in r["sdpa_q_k"]) for r in results]

    pool = dist_pool(W)
    zig = work(pool.run("tests.test_sp_softmax:case_sp_attn", algo="lasp2h", layout="zigzag", causal=True,
                        dtype="f64", heads="gqa2", chunk_len=L))
    con = work(pool.run("tests.test_sp_softmax:case_sp_attn", algo="lasp2h", layout="contiguous", causal=True,
                        dtype="f64", heads="gqa2", chunk_len=L))
    assert len(set(zig)) == 1, zig
    assert con == sorted(con) and con[-1] / con[0] == pytest.approx(2 * W - 1, rel=0.05), con


def case_bad_heads():
    q = torch.randn(1, 8, 6, 4)
    try:
        ulysses_softmax_attn(q, q, q)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ulysses_heads_not_divisible_is_a_clear_error(dist_pool):
    assert all("6 heads are not divisible by 4 ranks" in m for m in dist_pool(4).run("tests.test_sp_softmax:case_bad_heads"))


@pytest.mark.parametrize(
    "shapes, kwargs, err, match",
    [
        (((2, 8, 4), (2, 8, 4), (2, 8, 4)), {}, ValueError, r"q must be \[B, T, H, D\], got shape \(2, 8, 4\)"),
        (((2, 8, 4, 4), (1, 8, 4, 4), (1, 8, 4, 4)), {}, ValueError, "must share (the )?batch"),
        (((2, 8, 4, 4), (2, 8, 4, 4), (2, 6, 4, 4)), {}, ValueError, r"k, v the length.*v \(2, 6, 4, 4\)"),
        (((2, 9, 4, 4), (2, 8, 4, 4), (2, 8, 4, 4)), {}, ValueError, r"more queries \(9\) than keys \(8\)"),
        (((2, 8, 4, 4), (2, 8, 4, 4), (2, 8, 4, 4)), dict(scale=0), ValueError, "scale must be a finite number > 0"),
        (((2, 8, 4, 4), (2, 8, 4, 4), (2, 8, 4, 4)), dict(causal="no"), TypeError, "causal must be True or False"),
    ],
)
def test_softmax_attn_checks_like_the_sp_ops(shapes, kwargs, err, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(err, match=match):
        softmax_attn(q, k, v, **kwargs)
    if q.dim() == 4 and q.shape[1] == k.shape[1]:  # the SP ops on one rank refuse the same
        same = "must share" if "share" in match or "the length" in match else match  # q, k, v as one
        for fn in SOFTMAX.values():
            with pytest.raises(err, match=same):
                fn(q, k, v, layout="contiguous", **kwargs)
