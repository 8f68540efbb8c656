"""Data-dependent gates and the delta rule across ranks: LASP-2 (one all-gather of the chunks' affine maps
each way), LASP-1 and Ulysses on W gloo processes reproduce the token recurrence in float64 on the whole
sequence: the output and the gradients of q, k, v, the gate and beta, on every rank. (The halos of the
convolutions and windows: test_sp_halo.py.)

Forms: "scalar" and "vector" gates (simple GLA, GLA); the delta rule without a gate ("deltanet"), with a
scalar gate ("gdn", Gated DeltaNet) and with a vector gate ("kda")."""

import pytest
import torch
import torch.distributed as dist

from lasp import SeqLayout, lasp1_linear_attn, lasp2_linear_attn, ring_linear_attn, shard_sequence, sp_linear_attn
from lasp.distributed.agree import HEADER_BYTES
from lasp.kernels import recurrent_linear_attn
from lasp.kernels.linear_attn.naive import recurrent_delta_product, recurrent_delta_rule
from tests.dist import assert_close_rel, c10d_ops, comm_events, profiled_steady_step

ALGOS = {
    "lasp2": lasp2_linear_attn,
    "lasp1": lasp1_linear_attn,
    "ulysses": lambda *a, kernel=None, **kw: sp_linear_attn(*a, method="ulysses", **kw),
    "ring-right": lambda *a, kernel=None, gate=None, **kw: ring_linear_attn(*a, form="right", **kw),
    "ring-quadratic": lambda *a, kernel=None, gate=None, **kw: ring_linear_attn(*a, form="quadratic", **kw),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32}
TOL = {"f64": 1e-10, "f32": 2e-5}
DELTA = {"deltanet": None, "gdn": "scalar", "kda": "vector", "product": "scalar"}  # -> their gate's form
HOUSEHOLDER = {"product": 2}  # Gated DeltaProduct: two delta-rule steps per token
GATE_FORMS = ["scalar", "vector", *DELTA]


def gated_inputs(B, N, H, Hkv, K, V, form, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (
        torch.randn(*s, generator=gen, dtype=torch.float64)
        for s in [(B, N, H, K), (B, N, Hkv, K), (B, N, Hkv, V), (B, N, H, V)]
    )
    shape = (B, N, H) if DELTA.get(form, form) == "scalar" else (B, N, H, K)
    per_head = torch.linspace(0.02, 1.0, H, dtype=torch.float64).view(1, 1, H, *([1] * (len(shape) - 3)))
    gate = -torch.rand(shape, generator=gen, dtype=torch.float64) * per_head
    return q, k, v, gate, do


def delta_inputs(B, N, H, Hkv, K, V, form, seed=1234):
    """The delta rule's inputs: L2-normalised k (as the layer gives it), beta in (0.05, 1.95), so above 1
    too, and the form's gate or None."""
    q, k, v, gate, do = gated_inputs(B, N, H, Hkv, K, V, form, seed)
    n = HOUSEHOLDER.get(form, 1)
    if n > 1:  # DeltaProduct: n keys, values and betas per token
        _, k, v, _, _ = gated_inputs(B, N * n, H, Hkv, K, V, form, seed + 2)
    gen = torch.Generator().manual_seed(seed + 1)
    beta = torch.rand(B, N * n, H, generator=gen, dtype=torch.float64) * 1.9 + 0.05
    return q, torch.nn.functional.normalize(k, dim=-1), v, None if DELTA[form] is None else gate, do, beta


def reference(q, k, v, gate, do, beta=None, cu_seqlens=None, log_decay=None, householder=None):
    """The token recurrence in float64 on the whole sequence: the output and the gradients of q, k, v, the
    gate and beta (None for those not given)."""
    full = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, gate, beta)]
    rep = q.shape[2] // k.shape[2]
    kx, vx = (x.repeat_interleave(rep, dim=2) for x in full[1:3])
    if householder is not None:
        o, _ = recurrent_delta_product(full[0], kx, vx, full[4], householder, gate=full[3], cu_seqlens=cu_seqlens)
    elif beta is None:
        o, _ = recurrent_linear_attn(full[0], kx, vx, gate=full[3], log_decay=log_decay, cu_seqlens=cu_seqlens)
    else:
        o, _ = recurrent_delta_rule(full[0], kx, vx, full[4], gate=full[3], cu_seqlens=cu_seqlens)
    o.backward(do)
    return o.detach(), [None if x is None else x.grad for x in full]


def case_sp_gated(algo, layout, form, dtype, chunk_len, B=2, H=4, Hkv=2, K=6, V=5, block=4):
    from lasp.kernels import TorchChunkKernel

    rank, W = dist.get_rank(), dist.get_world_size()
    N = chunk_len * SeqLayout(layout, W).num_chunks
    if form in DELTA:
        q, k, v, gate, do, beta = delta_inputs(B, N, H, Hkv, K, V, form)
    else:
        (q, k, v, gate, do), beta = gated_inputs(B, N, H, Hkv, K, V, form), None
    n = HOUSEHOLDER.get(form)
    o_ref, grads_ref = reference(q, k, v, gate, do, beta, householder=n)
    dt = DTYPES[dtype]
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    local = [None if x is None else shard(x).to(dt).requires_grad_() for x in (q, k, v, gate, beta)]
    kernel = TorchChunkKernel(block=block, segment_blocks=2)
    extra = {} if beta is None else {"beta": local[4]}
    extra.update({} if n is None else {"householder": n})
    run = lambda: ALGOS[algo](*local[:3], gate=local[3], layout=layout, kernel=kernel, **extra)  # noqa: E731
    o, pf, pb = profiled_steady_step(run, shard(do).to(dt))
    assert_close_rel(o, shard(o_ref).to(dt), TOL[dtype], "o")
    for name, got, ref in zip(["q", "k", "v", "gate", "beta"], local, grads_ref):
        if got is not None:
            assert_close_rel(got.grad, shard(ref).to(dt), TOL[dtype] * (1 if name in "qkv" else 5), f"d{name}")
    return {"fwd": comm_events(pf), "bwd": comm_events(pb), "c10d_fwd": c10d_ops(pf), "c10d_bwd": c10d_ops(pb)}


# float32 on zigzag only (the layout with the most chunk pairs); float64 at W = 1, 2, 4 (tests/test_sp_methods.py
# runs every form of every method at W = 3, against linear_attn)
GATED_CASES = [
    (W, layout, dtype)
    for W in (1, 2, 3, 4)
    for layout in ("contiguous", "zigzag")
    for dtype in DTYPES
    if not (dtype == "f32" and layout == "contiguous") and not (dtype == "f64" and W == 3)
]


@pytest.mark.parametrize("form", GATE_FORMS)
@pytest.mark.parametrize("W, layout, dtype", GATED_CASES)
def test_lasp2_gated_matches_the_recurrence(dist_pool, W, layout, form, dtype):
    chunk_len = 13 if W % 2 else 9
    results = dist_pool(W).run(
        "tests.test_sp_gated:case_sp_gated", algo="lasp2", layout=layout, form=form, dtype=dtype, chunk_len=chunk_len
    )
    n, item = SeqLayout(layout, W).chunks_per_rank, 8 if dtype == "f64" else 4
    # forward: each chunk's (D, M), B x H x (K V + Kg), with the delta rule's K x K transition B x H x
    # (K K + K V); backward: the state gradients, B x H x K x V
    fwd = HEADER_BYTES + n * 2 * 4 * (6 * 5 + pair_extra(form)) * item
    bwd = HEADER_BYTES + n * 2 * 4 * 6 * 5 * item
    for r in results:
        if W == 1:
            assert r["fwd"] == r["bwd"] == []
        else:
            assert r["fwd"] == [("gloo:all_gather", [[fwd]])], r["fwd"]
            assert r["bwd"] == [("gloo:all_gather", [[bwd]])], r["bwd"]
            assert r["c10d_fwd"] == r["c10d_bwd"] == ["c10d::_allgather_base_"]


def pair_extra(form: str, K: int = 6) -> int:
    """Floats a chunk's transition adds to its K x V state, per batch row and head."""
    return {"scalar": 1, "vector": K}.get(form, K * K)


@pytest.mark.parametrize("form", ["vector", "gdn"])
def test_lasp2_gated_bytes_do_not_depend_on_length(dist_pool, form):
    pool = dist_pool(2)
    short, long = (
        pool.run(
            "tests.test_sp_gated:case_sp_gated", algo="lasp2", layout="zigzag", form=form, dtype="f64", chunk_len=L
        )
        for L in (5, 31)
    )
    assert short == long


@pytest.mark.parametrize("form", GATE_FORMS)
@pytest.mark.parametrize("W", [2, 4])
def test_ulysses_gated_matches_the_recurrence(dist_pool, W, form):
    results = dist_pool(W).run(
        "tests.test_sp_gated:case_sp_gated", algo="ulysses", layout="zigzag", form=form, dtype="f64", chunk_len=5
    )
    # q, k, v, the output, and each of the gate and beta given: one all-to-all each way (+ the fingerprints)
    n = 4 + (form != "deltanet") + (form in DELTA)
    for r in results:
        assert r["c10d_fwd"].count("c10d::alltoall_base_") == n, r["c10d_fwd"]
        assert r["c10d_bwd"] == ["c10d::alltoall_base_"] * n, r["c10d_bwd"]


# Packed documents (cu_seqlens over the GLOBAL sequence): the state resets at every start, on every rank.


def doc_starts(N, L):
    """Row 0: 1-token documents at 0 and 1, a start exactly at the first chunk (rank) boundary L, three short
    ones, then one to the end (across three ranks or more at W >= 3). Row 1: a start mid-sequence and a
    1-token document at the very end."""
    return [[0, 1, 2, L, L + 2, L + 3, L + 5], [0, N // 2 + 1, N - 1]]


def case_sp_documents(algo, layout, chunk_len, B=2, H=4, Hkv=2, K=6, V=5):
    """Every linear form (no decay, a constant decay, scalar and vector gates, the delta rule's three) with
    documents: the output and every gradient against the token recurrence with the same documents, float64."""
    from lasp.kernels import TorchChunkKernel

    rank, W = dist.get_rank(), dist.get_world_size()
    N = chunk_len * SeqLayout(layout, W).num_chunks
    cu = doc_starts(N, chunk_len)
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    out = {}
    for form in ("none", "decay") if algo.startswith("ring") else ("none", "decay", *GATE_FORMS):
        if form in DELTA:
            q, k, v, gate, do, beta = delta_inputs(B, N, H, Hkv, K, V, form)
        else:
            q, k, v, gate, do = gated_inputs(B, N, H, Hkv, K, V, "vector" if form == "vector" else "scalar")
            beta, gate = None, gate if form in ("scalar", "vector") else None
        decay = -torch.linspace(0.05, 0.5, H, dtype=torch.float64) if form == "decay" else None
        n = HOUSEHOLDER.get(form)
        o_ref, grads = reference(q, k, v, gate, do, beta, cu_seqlens=cu, log_decay=decay, householder=n)
        local = [None if x is None else shard(x).requires_grad_() for x in (q, k, v, gate, beta)]
        kernel = TorchChunkKernel(block=4, segment_blocks=2)
        extra = {} if beta is None else {"beta": local[4]}
        extra.update({} if n is None else {"householder": n})
        run = lambda: ALGOS[algo](
            *local[:3],
            gate=local[3],
            log_decay=decay,
            layout=layout,  # noqa: E731
            kernel=kernel,
            cu_seqlens=cu,
            **extra,
        )
        o, pf, pb = profiled_steady_step(run, shard(do))
        assert_close_rel(o, shard(o_ref), 1e-10, f"{form}: o")
        for name, got, ref in zip(["q", "k", "v", "gate", "beta"], local, grads):
            if got is not None:
                assert_close_rel(got.grad, shard(ref), 1e-9, f"{form}: d{name}")
        out[form] = {"fwd": comm_events(pf), "bwd": comm_events(pb)}
    return out


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 3, 4])
def test_lasp2_documents_match_the_recurrence(dist_pool, W, layout):
    """Still one all-gather each way: each chunk's (D, M), D = 0 for a chunk holding a start; the forms
    without a gate run as a scalar gate, so their pairs carry one more float per head (the delta rule's
    carry its K x K transition as without documents)."""
    chunk_len = 7
    results = dist_pool(W).run(
        "tests.test_sp_gated:case_sp_documents", algo="lasp2", layout=layout, chunk_len=chunk_len
    )
    n = SeqLayout(layout, W).chunks_per_rank
    for r in results:
        for form, ev in r.items():
            extra = pair_extra("scalar" if form in ("none", "decay") else form)
            assert ev["fwd"] == [("gloo:all_gather", [[HEADER_BYTES + n * 2 * 4 * (6 * 5 + extra) * 8]])], (form, ev)
            assert ev["bwd"] == [("gloo:all_gather", [[HEADER_BYTES + n * 2 * 4 * 6 * 5 * 8]])], (form, ev)


@pytest.mark.parametrize(
    "algo,W,layout",
    [
        ("lasp1", 3, "zigzag"),
        ("lasp1", 2, "contiguous"),
        ("ulysses", 2, "zigzag"),
        ("ulysses", 4, "contiguous"),
        ("ring-right", 4, "zigzag"),
        ("ring-quadratic", 3, "contiguous"),
    ],
)
def test_the_baselines_documents_match_the_recurrence(dist_pool, algo, W, layout):
    """LASP-1 and Ulysses run the gated form; Ring for linear layers (no gate) masks each block pair."""
    dist_pool(W).run("tests.test_sp_gated:case_sp_documents", algo=algo, layout=layout, chunk_len=7)


def case_delta_long_float32(N, form, layout="zigzag", B=1, H=2, K=16, V=16):
    """LASP-2 of the delta rule in float32 over N tokens against the same in float64: the scanned chain of
    K x K transitions stays in float32 (never bf16 or tf32), so it keeps close at long context."""
    rank, W = dist.get_rank(), dist.get_world_size()
    q, k, v, gate, do, beta = delta_inputs(B, N, H, H, K, V, form)
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    outs = {}
    for dt in (torch.float64, torch.float32):
        local = [None if x is None else shard(x).to(dt).requires_grad_() for x in (q, k, v, gate, beta)]
        o = lasp2_linear_attn(*local[:3], gate=local[3], beta=local[4], layout=layout)
        o.backward(shard(do).to(dt))
        outs[dt] = [o.detach()] + [x.grad for x in local if x is not None]
    for name, lo, hi in zip(["o", "dq", "dk", "dv", "dgate", "dbeta"], outs[torch.float32], outs[torch.float64]):
        assert_close_rel(lo.double(), hi, 1e-4, f"{form} {name}")


def test_lasp2_delta_rule_in_float32_at_8192_tokens_follows_float64(dist_pool):
    dist_pool(2).run("tests.test_sp_gated:case_delta_long_float32", N=8192, form="gdn")
