"""LASP-2H, Ring Attention and Ulysses (softmax attention; Ulysses for linear attention: test_sp_linear.py) on
W gloo processes reproduce one process.

Each rank builds the full inputs from one seed, computes the single-process reference, runs the SP op on
its shard under the profiler and compares its shards of the output and of the q, k, v gradients. Packed
documents (`cu_seqlens`): the single-device op against each document run alone, the block functions Ring
merges, then the SP ops with documents against the single-device op.
"""

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from lasp import (
    SeqLayout,
    lasp2h_softmax_attn,
    ring_softmax_attn,
    shard_sequence,
    softmax_attn,
    ulysses_softmax_attn,
)
from lasp.distributed.agree import RanksDisagree
from lasp.distributed.events import profiled_ops
from lasp.kernels.documents import as_documents
from lasp.kernels.softmax_attn import attn_block_bwd, attn_with_lse, merge_partials
from tests.dist import assert_close_rel, c10d_ops

SOFTMAX = {"lasp2h": lasp2h_softmax_attn, "ring": ring_softmax_attn, "ulysses": ulysses_softmax_attn}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
TOL = {"f64": 1e-10, "f32": 1e-5}
HEADS = {"mha": (12, 12), "gqa2": (12, 6), "gqa4": (12, 3), "mqa": (12, 1)}


def _profiled(fn, *args, **kwargs):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn(*args, **kwargs)
    return out, prof


def doc_starts(N, L):
    """Row 0: 1-token documents at 0 and 1, short ones, a start exactly at the first chunk (rank) boundary
    L, one from L+1 to 3L+1 (across three ranks at W = 4, either layout) and a 1-token one at the end. Row
    1: a 1-token document in the middle."""
    return [
        [0, 1, 2, 4, 5, 6, L, L + 1] + ([3 * L + 1] if 3 * L + 1 < N - 1 else []) + [N - 1],
        [0, 3, N // 2, N // 2 + 1],
    ]


def case_sp_attn(algo, layout, causal, dtype, heads, chunk_len, docs=False, B=2, D=4, Dv=3):
    rank, W = dist.get_rank(), dist.get_world_size()
    dt, (Hq, Hkv) = DTYPES[dtype], HEADS[heads]
    N = chunk_len * SeqLayout(layout, W).num_chunks
    cu = doc_starts(N, chunk_len) if docs else None
    gen = torch.Generator().manual_seed(4321)
    shapes = [(B, N, Hq, D), (B, N, Hkv, D), (B, N, Hkv, Dv), (B, N, Hq, Dv)]
    q, k, v, do = (torch.randn(*s, generator=gen, dtype=dt) for s in shapes)
    ref_fn = lambda q, k, v: softmax_attn(q, k, v, causal=causal, cu_seqlens=cu)  # noqa: E731
    sp_fn = lambda q, k, v: SOFTMAX[algo](q, k, v, layout=layout, causal=causal, cu_seqlens=cu)  # noqa: E731

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
    sdpa = [e.input_shapes for e in profiled_ops(pf, "aten::scaled_dot_product_attention")]
    # SDPA takes [B, H, T, D]: record (query length, key length) of every call
    return {"fwd": c10d_ops(pf), "bwd": c10d_ops(pb), "sdpa_q_k": [(s[0][2], s[1][2]) for s in sdpa]}


FINGERPRINTS = ["c10d::_allgather_base_"]  # ops whose collectives carry no header exchange one per call
EXPECTED = {
    "lasp2h": lambda W: (["c10d::_allgather_base_"], ["c10d::_reduce_scatter_base_"]),
    "ring": lambda W: (FINGERPRINTS + ["c10d::send", "c10d::recv_"] * (W - 1), ["c10d::send", "c10d::recv_"] * W),
    "ulysses": lambda W: (FINGERPRINTS + ["c10d::alltoall_base_"] * 4, ["c10d::alltoall_base_"] * 4),
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
        algo=algo,
        layout=layout,
        causal=causal,
        dtype="f64",
        heads=heads,
        chunk_len=chunk_len,
    )
    _check(res, algo, W)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("algo", list(SOFTMAX))
def test_softmax_sp_matches_single_process_f32(dist_pool, algo, W, layout, causal):
    res = dist_pool(W).run(
        "tests.test_sp_softmax:case_sp_attn",
        algo=algo,
        layout=layout,
        causal=causal,
        dtype="f32",
        heads="gqa4",
        chunk_len=37,
    )
    _check(res, algo, W)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 4])
def test_softmax_sp_documents_match_single_process(dist_pool, W, layout):
    """Every op with `doc_starts` (not causal too, at W = 2): the same collectives as without documents."""
    pool = dist_pool(W)
    for algo in SOFTMAX:
        for causal in (True, False) if W == 2 else (True,):
            res = pool.run(
                "tests.test_sp_softmax:case_sp_attn",
                algo=algo,
                layout=layout,
                causal=causal,
                dtype="f64",
                heads="gqa2",
                chunk_len=7,
                docs=True,
            )
            _check(res, algo, W)


@pytest.mark.parametrize("W", [2, 4])
def test_lasp2h_zigzag_balances_causal_work(dist_pool, W):
    """Score entries each rank's SDPA calls attend (causal, end-aligned: L*(S-L) + L(L+1)/2 per call)."""
    L = 40

    def work(results):
        return [sum(lq * (sk - lq) + lq * (lq + 1) // 2 for lq, sk in r["sdpa_q_k"]) for r in results]

    pool = dist_pool(W)
    zig = work(
        pool.run(
            "tests.test_sp_softmax:case_sp_attn",
            algo="lasp2h",
            layout="zigzag",
            causal=True,
            dtype="f64",
            heads="gqa2",
            chunk_len=L,
        )
    )
    con = work(
        pool.run(
            "tests.test_sp_softmax:case_sp_attn",
            algo="lasp2h",
            layout="contiguous",
            causal=True,
            dtype="f64",
            heads="gqa2",
            chunk_len=L,
        )
    )
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
    assert all(
        "6 heads are not divisible by 4 ranks" in m for m in dist_pool(4).run("tests.test_sp_softmax:case_bad_heads")
    )


def case_bad_documents():
    """Documents past the GLOBAL length on every rank, then documents that differ by rank."""
    q, rank, out = torch.randn(1, 8, 4, 4), dist.get_rank(), {}
    for name, fn in SOFTMAX.items():
        for what, cu in (("bad", [0, 16, 20]), ("differ", [0, 3 + rank])):
            try:
                fn(q, q, q, cu_seqlens=cu)
                out[f"{name} {what}"] = "no error"
            except ValueError as e:
                out[f"{name} {what}"] = f"{type(e).__name__}: {e}"
    return out


def test_sp_documents_are_checked_on_every_rank(dist_pool):
    for res in dist_pool(2).run("tests.test_sp_softmax:case_bad_documents"):
        for name in SOFTMAX:
            assert "ends at 20, past the sequence of 16 tokens" in res[f"{name} bad"], res
            differ = f"{RanksDisagree.__name__}: {name}: ranks disagree on documents: rank 0"
            assert res[f"{name} differ"].startswith(differ), res


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


def _each_document_alone(q, k, v, cu, causal):
    """The reference: softmax_attn on each document of each row on its own."""
    T, rows = q.shape[1], []
    for b, starts in enumerate(cu):
        ends = [s for s in starts if s < T] + [T]
        rows.append(
            torch.cat(
                [
                    softmax_attn(q[b : b + 1, s:e], k[b : b + 1, s:e], v[b : b + 1, s:e], causal=causal)
                    for s, e in zip(ends, ends[1:])
                ],
                dim=1,
            )
        )
    return torch.cat(rows)


@pytest.mark.parametrize("qblock", [4096, 5], ids=["whole", "query-blocks-of-5"])
@pytest.mark.parametrize("heads", ["mha", "gqa4"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_softmax_attn_documents_match_each_document_alone(monkeypatch, causal, heads, qblock):
    """1-token documents first, in the middle and last; one row with the trailing N, one without. With
    query blocks of 5, each block attends only to the keys of its documents' span."""
    from lasp.kernels.softmax_attn import ops

    monkeypatch.setattr(ops, "DOC_QUERY_BLOCK", qblock)
    (Hq, Hkv), T = HEADS[heads], 23
    cu = [[0, 1, 2, 9, 10, 22, 23], [0, 12]]
    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (
        torch.randn(2, T, h, d, generator=gen, dtype=torch.float64) for h, d in ((Hq, 4), (Hkv, 4), (Hkv, 3), (Hq, 3))
    )
    outs = []
    for fn in (
        lambda *x: softmax_attn(*x, causal=causal, cu_seqlens=cu),
        lambda *x: _each_document_alone(*x, cu, causal),
    ):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*x)
        o.backward(do)
        outs.append([o, *(t.grad for t in x)])
    for name, got, want in zip(["o", "dq", "dk", "dv"], *outs):
        assert_close(got, want, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")


def test_attention_blocks_with_documents_merge_to_the_op():
    """Keys in two blocks: a query with no key of its document in a block gets lse = -inf, o = 0 and zero
    gradients there (no NaN, even merging two such partials); the blocks add up to the op."""
    T, cu, scale = 12, [0, 1, 5, 8], 0.5  # block 0 = keys 0..5 holds no key of [8, 12), block 1 none of [0, 5)
    ids = as_documents(cu, 1, T).ids()
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, T, h, 4, generator=gen, dtype=torch.float64) for h in (4, 2, 2, 4))
    blocks = (slice(0, 6), slice(6, T))
    parts = [attn_with_lse(q, k[:, b], v[:, b], causal=False, scale=scale, doc_ids=(ids, ids[:, b])) for b in blocks]
    for (o_b, lse_b), empty in zip(parts, (slice(8, T), slice(0, 5))):
        assert (lse_b[:, empty] == float("-inf")).all() and (o_b[:, empty] == 0).all()
        assert lse_b[:, :, 0].isfinite().sum() == T - (empty.stop - empty.start)
    o_none, lse_none = merge_partials(*parts[0], *parts[0])
    assert (lse_none[:, 8:] == float("-inf")).all() and (o_none[:, 8:] == 0).all() and not o_none.isnan().any()
    o, lse = merge_partials(*parts[0], *parts[1])

    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = softmax_attn(*x, causal=False, scale=scale, cu_seqlens=cu)
    o_ref.backward(do)
    assert_close(o, o_ref.detach(), atol=1e-12, rtol=1e-12)
    delta = (do * o).sum(-1)
    grads = [
        attn_block_bwd(q, k[:, b], v[:, b], do, lse, delta, causal=False, scale=scale, doc_ids=(ids, ids[:, b]))
        for b in blocks
    ]
    assert (grads[0][0][:, 8:] == 0).all() and (grads[1][0][:, :5] == 0).all()
    assert_close(grads[0][0] + grads[1][0], x[0].grad, atol=1e-12, rtol=1e-12)
    for i in (1, 2):
        assert_close(torch.cat([grads[0][i], grads[1][i]], dim=1), x[i].grad, atol=1e-12, rtol=1e-12)
    own = attn_block_bwd(
        q, k[:, :6], v[:, :6], do, parts[0][1], delta, causal=False, scale=scale, doc_ids=(ids, ids[:, :6])
    )  # a block's own -inf lse
    assert all(not g.isnan().any() for g in own) and (own[0][:, 8:] == 0).all()


def test_bad_cu_seqlens_are_clear_errors():
    q = torch.randn(2, 8, 4, 4)
    for fn in [softmax_attn] + [lambda *x, f=f, **kw: f(*x, layout="contiguous", **kw) for f in SOFTMAX.values()]:
        with pytest.raises(ValueError, match=r"row 1: cu_seqlens must be strictly increasing .*got 5 then 3"):
            fn(q, q, q, cu_seqlens=[[0, 4], [0, 5, 3]])
        with pytest.raises(ValueError, match=r"cu_seqlens has 1 row\(s\) for a batch of 2"):
            fn(q, q, q, cu_seqlens=[0, 4])
    with pytest.raises(ValueError, match=r"cu_seqlens needs as many queries as keys, got Tq=4 and Tk=8"):
        softmax_attn(q[:, :4], q, q, cu_seqlens=[[0, 2], [0]])
