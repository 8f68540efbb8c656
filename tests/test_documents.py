"""Packed documents on one device: `cu_seqlens` parsing, and linear attention that resets its state at every
document start (and gates of exactly 0), against the token recurrence and against running each document
alone, in float64. The SP ops with documents: tests/test_sp_gated.py and tests/test_sp_softmax.py."""

import pytest
import torch

from lasp import linear_attn
from lasp.kernels import TorchChunkKernel, recurrent_linear_attn
from lasp.kernels.documents import Documents, as_documents
from lasp.kernels.protocol import Capabilities
from lasp.kernels.scan import affine_scan, compose
from lasp.sp import ring_linear_attn
from tests.test_gated_linear_attn import _grads, _inputs

TOL = dict(atol=1e-10, rtol=1e-10)
FORMS = ["none", "decay", "scalar", "vector"]


def test_cu_seqlens_forms_and_derived_tensors():
    d = as_documents([0, 1, 4, 10], 1, 10)  # flash-attention's convention: the trailing N is optional
    assert d.starts == ((0, 1, 4),) and as_documents(torch.tensor([0, 1, 4]), 1, 10).starts == d.starts
    assert d.ids().tolist() == [[0, 1, 1, 1, 2, 2, 2, 2, 2, 2]]
    assert d.positions().tolist() == [[0, 0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert d.resets().tolist() == [[False, True, False, False, True] + [False] * 5]
    two = as_documents([[0, 6], torch.tensor([0, 2, 3, 10])], 2, 10)
    assert two.starts == ((0, 6), (0, 2, 3)) and as_documents(two, 2, 10) is two
    assert Documents.from_eos(torch.tensor([[5, 0, 7, 7, 0, 0, 3]]), eos_id=0).starts == ((0, 2, 5, 6),)
    assert not as_documents([0], 1, 4).has_resets and d.has_resets
    assert d.digest() != as_documents([0, 1, 5], 1, 10).digest()
    assert [two.start_of(t) for t in (0, 2, 5, 6, 9)] == [0, 0, 0, 3, 3]  # the earliest over the rows
    assert [two.end_of(t) for t in (0, 2, 5, 6, 9)] == [6, 6, 10, 10, 10]  # the latest over the rows


def test_bad_cu_seqlens_name_every_problem():
    with pytest.raises(ValueError, match=r"ends at 9, past the sequence of 8.*row 0: .*3 then 3.*row 1: .*start at 0"):
        as_documents([[0, 3, 3], [1, 9]], 2, 8)
    with pytest.raises(ValueError, match="2 row\\(s\\) for a batch of 3"):
        as_documents([[0], [0]], 3, 8)
    with pytest.raises(ValueError, match="describes 1 rows of 10 tokens, but the input has B=1 rows of N=12"):
        as_documents(as_documents([0], 1, 10), 1, 12)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        as_documents(torch.tensor([0.0, 2.0]), 1, 8)
    with pytest.raises(TypeError, match="must be a Documents"):
        as_documents("0,3", 1, 8)


def _run(form, T=45, cu=([0, 1, 2, 17, 18, 30, 44], [0, 33]), block=8, span=None, Hkv=3):
    """(ours, reference) outputs, final states and gradients of every input, for one form."""
    B, H, K, V = 2, 3, 6, 5
    q, k, v, gate, s0 = _inputs(B, T, H, K, V, torch.float64, "vector" if form == "vector" else "scalar", Hkv=Hkv)
    decay = -torch.linspace(0.05, 0.6, H, dtype=torch.float64) if form == "decay" else None
    g = gate if form in ("scalar", "vector") else None
    kw = dict(log_decay=decay, gate=g, initial_state=s0)
    o, sT = linear_attn(
        q,
        k,
        v,
        **kw,
        output_final_state=True,
        cu_seqlens=list(cu),
        kernel=TorchChunkKernel(block=block, segment_blocks=2),
    )
    rep = H // Hkv
    o_ref, sT_ref = recurrent_linear_attn(
        q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), **kw, cu_seqlens=list(cu)
    )
    ins = [q, k, v, s0] + ([g] if g is not None else [])
    return (o, sT, *_grads([o, sT], ins)), (o_ref, sT_ref, *_grads([o_ref, sT_ref], ins))


@pytest.mark.parametrize("form", FORMS)
def test_documents_match_the_recurrence(form):
    """Odd T, K != V, GQA, initial and final states, 1-token documents (at 0 and 1), a start on a block
    boundary (16), documents shorter than a block, and one start at the last token."""
    ours, ref = _run(form)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "ds0", "dgate"], ours, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{form} {name}: {m}")


@pytest.mark.parametrize("span", [-1.0, 1e9], ids=["exact-weights", "factored"])
def test_documents_in_both_forms_of_the_vector_gate(monkeypatch, span):
    from lasp.kernels.linear_attn import gated

    monkeypatch.setattr(gated, "FACTOR_SPAN", span)
    ours, ref = _run("vector", block=32)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_documents_equal_running_each_document_alone():
    """The packed row gives exactly what each document gives alone from a zero state (the first one from
    initial_state), and the final state is the last document's."""
    B, T, H, K, V = 1, 40, 2, 4, 3
    q, k, v, gate, s0 = _inputs(B, T, H, K, V, torch.float64, "scalar")
    starts = [0, 5, 6, 23]
    o, sT = linear_attn(q, k, v, gate=gate, initial_state=s0, output_final_state=True, cu_seqlens=starts)
    bounds = starts + [T]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = linear_attn(
            q[:, a:b],
            k[:, a:b],
            v[:, a:b],
            gate=gate[:, a:b],
            initial_state=s0 if i == 0 else None,
            output_final_state=True,
        )
        torch.testing.assert_close(o[:, a:b], part[0], **TOL)
    torch.testing.assert_close(sT, part[1], **TOL)


def test_a_gate_of_zero_is_a_reset_per_head_with_no_gradient():
    """-inf in a log-gate (a gate of exactly 0) resets that head's state only; its gradient is 0 and the
    rest of the gate's gradient matches the recurrence."""
    q, k, v, gate, s0 = _inputs(2, 29, 3, 4, 4, torch.float64, "scalar")
    g = gate.detach().clone()
    g[0, 11, 1] = g[1, 0, 2] = g[1, 20, 0] = -torch.inf
    g.requires_grad_()
    o, sT = linear_attn(
        q, k, v, gate=g, initial_state=s0, output_final_state=True, kernel=TorchChunkKernel(block=8, segment_blocks=2)
    )
    o_ref, sT_ref = recurrent_linear_attn(q, k, v, gate=g, initial_state=s0)
    torch.testing.assert_close(o, o_ref, **TOL)
    ins = [q, k, v, s0, g]
    got, want = _grads([o, sT], ins), _grads([o_ref, sT_ref], ins)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, **TOL)
    dg = got[4]
    assert dg[0, 11, 1] == dg[1, 0, 2] == dg[1, 20, 0] == 0
    finite = torch.isfinite(g)
    torch.testing.assert_close(dg[finite], want[4][finite], **TOL)


def test_documents_are_refused_where_they_cannot_run():
    q, k, v, gate, _ = _inputs(1, 8, 2, 4, 4, torch.float64, "vector")
    with pytest.raises(ValueError, match=r"gate\[0, 3, 0\] is -inf on 2 of 4"):
        bad = gate.detach().clone()
        bad[0, 3, 0, :2] = -torch.inf
        linear_attn(q, k, v, gate=bad)
    with pytest.raises(ValueError, match="not NaN.*nan"):
        bad = gate.detach().clone()
        bad[0, 1, 1, 1] = torch.nan
        linear_attn(q, k, v, gate=bad)

    class NoGates(TorchChunkKernel):
        name, caps = "triton", Capabilities()

    with pytest.raises(ValueError, match="start at 0.*causal=True.*'triton' kernel has no document resets"):
        linear_attn(q, k, v, causal=False, cu_seqlens=[1, 4], kernel=NoGates())
    with pytest.raises(ValueError, match="cu_seqlens needs causal=True"):
        ring_linear_attn(q, k, v, causal=False, cu_seqlens=[0, 4])


def test_one_document_is_the_plain_call():
    q, k, v, _, _ = _inputs(1, 12, 2, 4, 4, torch.float64, "scalar")
    torch.testing.assert_close(linear_attn(q, k, v, cu_seqlens=[0, 12]), linear_attn(q, k, v), rtol=0, atol=0)


def _dense(A, K):
    """A transition of any kind as its K x K matrix."""
    if A.shape[-1] != 1:
        return A
    return torch.diag_embed(A[..., 0].expand(*A.shape[:-2], K))


@pytest.mark.parametrize(
    "kinds", [("scalar",) * 5, ("diagonal",) * 5, ("full",) * 5, ("full", "diagonal", "scalar", "full", "diagonal")]
)
def test_the_combine_is_associative_and_is_the_scan(kinds):
    """(A2, M2) o (A1, M1) in any grouping, with a reset (A = 0) inside, equals the sequential scan's carry and
    its transposed scan: for every kind of transition, mixed kinds included."""
    g = torch.Generator().manual_seed(0)
    K, V = 3, 2
    shape = {"scalar": (2, 1, 1), "diagonal": (2, K, 1), "full": (2, K, K)}
    A = [torch.rand(shape[kind], generator=g, dtype=torch.float64) for kind in kinds]
    A[2] = torch.zeros_like(A[2])
    M = torch.randn(len(kinds), 2, K, V, generator=g, dtype=torch.float64)
    pairs = list(zip(A, M))
    left = pairs[0]
    for p in pairs[1:]:
        left = compose(p, left)
    right = pairs[-1]
    for p in reversed(pairs[:-1]):
        right = compose(right, p)
    mid = compose(compose(pairs[4], pairs[3]), compose(compose(pairs[2], pairs[1]), pairs[0]))
    for a, b in [(left, right), (left, mid)]:
        torch.testing.assert_close(_dense(a[0], K), _dense(b[0], K), **TOL)
        torch.testing.assert_close(a[1], b[1], **TOL)
    full = torch.stack([_dense(a, K) for a in A])
    out, carry = affine_scan(full, M)
    torch.testing.assert_close(carry, left[1], **TOL)
    for i in range(1, len(kinds)):
        torch.testing.assert_close(out[i], affine_scan(full[:i], M[:i])[1], **TOL)
    back, _ = affine_scan(full, M, reverse=True)  # out_{i-1} = A_i^T out_i + x_i
    want = torch.zeros_like(M[0])
    for i in range(len(kinds) - 1, 0, -1):
        want = M[i] + full[i].transpose(-1, -2) @ want
        torch.testing.assert_close(back[i - 1], want, **TOL)
