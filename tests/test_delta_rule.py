"""The delta rule on one device (DeltaNet, Gated DeltaNet, KDA) against the token recurrence, float64 unless
stated: outputs, final states and the gradients of q, k, v, beta, the gate and the initial state."""

import pytest
import torch
import torch.nn.functional as F

from lasp import lasp2_linear_attn, linear_attn, ring_linear_attn
from lasp.kernels.linear_attn import delta
from lasp.kernels.linear_attn.naive import recurrent_delta_rule

FORMS = {"deltanet": None, "gdn": "scalar", "kda": "vector"}


def _inputs(B, T, H, K, V, form, Hkv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, v, s0 = rnd(B, T, H, K), rnd(B, T, Hkv, V), rnd(B, H, K, V)
    k = F.normalize(rnd(B, T, Hkv, K), dim=-1)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64) * 1.9 + 0.1  # (0.1, 2.0): above 1 too
    gate = None
    if FORMS[form] is not None:
        gate = (
            -torch.rand(*((B, T, H) if FORMS[form] == "scalar" else (B, T, H, K)), generator=g, dtype=torch.float64)
            * 0.6
        )
    return [None if x is None else x.to(dtype).requires_grad_() for x in (q, k, v, beta, gate, s0)]


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    got = torch.autograd.grad(loss, [x for x in inputs if x is not None])
    it = iter(got)
    return [None if x is None else next(it) for x in inputs]


def _check(ins, cu_seqlens=None, tol=1e-10, scale=None):
    q, k, v, beta, gate, s0 = ins
    o, sT = linear_attn(
        q, k, v, beta=beta, gate=gate, initial_state=s0, output_final_state=True, cu_seqlens=cu_seqlens, scale=scale
    )
    rep = q.shape[2] // k.shape[2]
    ref_ins = [None if x is None else x.detach().double().requires_grad_() for x in ins]
    kx, vx = (x.repeat_interleave(rep, dim=2) for x in ref_ins[1:3])
    o_ref, sT_ref = recurrent_delta_rule(
        ref_ins[0], kx, vx, ref_ins[3], gate=ref_ins[4], scale=scale, initial_state=ref_ins[5], cu_seqlens=cu_seqlens
    )
    torch.testing.assert_close(o, o_ref.to(o.dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(sT, sT_ref.to(sT.dtype), atol=tol, rtol=tol)
    names = "q k v beta gate s0".split()
    for name, got, want in zip(names, _grads([o, sT], ins), _grads([o_ref, sT_ref], ref_ins)):
        if got is not None:
            torch.testing.assert_close(
                got, want.to(got.dtype), atol=tol * 10, rtol=tol * 10, msg=lambda m, name=name: f"d{name}: {m}"
            )


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("T", [1, 37, 150])  # one token; odd; more than two 64-token blocks
def test_matches_the_recurrence(form, T):
    _check(_inputs(2, T, 3, 8, 5, form), scale=0.4)  # K != V


@pytest.mark.parametrize("form", list(FORMS))
def test_gqa_and_no_states(form):
    q, k, v, beta, gate, _ = _inputs(1, 70, 4, 6, 7, form, Hkv=2)
    _check([q, k, v, beta, gate, None])


def test_a_gate_of_zero_resets_the_state():
    for form in ("gdn", "kda"):
        q, k, v, beta, gate, s0 = _inputs(1, 40, 2, 4, 4, form)
        g = gate.detach().clone()
        g[0, 17] = -torch.inf  # the state is dropped before token 17, on every head (KDA: on every key dim)
        g.requires_grad_()
        _check([q, k, v, beta, g, s0])


@pytest.mark.parametrize("form", list(FORMS))
def test_documents(form):
    """A 1-token document, a start on a block boundary (64) and one just after; the initial state feeds the
    first document of each row only."""
    ins = _inputs(2, 150, 2, 5, 4, form)
    _check(ins, cu_seqlens=[[0, 1, 64, 65, 150], [0, 90, 150]])


def test_the_backward_by_segments_and_both_vector_gate_paths(monkeypatch):
    """SEGMENT tokens of the backward's graph at a time (here 64, so 3 segments with a start inside one), and
    KDA with a gate too strong to factor (exact 16-token blocks) next to the factored one."""
    monkeypatch.setattr(delta, "SEGMENT", 64)
    for form in FORMS:
        _check(_inputs(1, 150, 2, 5, 4, form), cu_seqlens=[0, 100, 150])
    q, k, v, beta, gate, s0 = _inputs(1, 150, 2, 5, 4, "kda")
    strong = (gate.detach() * 8).requires_grad_()  # sums to about -150 over 64 tokens
    assert not bool((strong.detach()[:, :64].sum(1) >= -delta.FACTOR_SPAN).all())
    _check([q, k, v, beta, strong, s0])


def test_float32_follows_float64():
    ins = _inputs(2, 200, 2, 16, 16, "gdn", dtype=torch.float32)
    _check(ins, tol=2e-5)


def test_gradcheck_tiny():
    for form in FORMS:
        q, k, v, beta, gate, s0 = _inputs(1, 5, 1, 3, 2, form)

        def fn(q, k, v, beta, s0, *gate):
            o, sT = linear_attn(
                q, k, v, beta=beta, gate=gate[0] if gate else None, initial_state=s0, output_final_state=True
            )
            return o, sT

        assert torch.autograd.gradcheck(fn, (q, k, v, beta, s0, *([] if gate is None else [gate])))


def test_chunk_maps_are_the_chunk_as_an_affine_map():
    """What LASP-2 gathers: o = o0 + Qm S_in and S_out = A S_in + M, for any S_in."""
    q, k, v, beta, gate, s0 = (x.detach() for x in _inputs(2, 77, 3, 6, 5, "kda"))
    o0, Qm, A, M = delta.chunk_maps(q, k, v, beta, gate, 0.3)
    o, sT = recurrent_delta_rule(q, k, v, beta, gate=gate, scale=0.3, initial_state=s0)
    torch.testing.assert_close(o0 + torch.einsum("bthk,bhkv->bthv", Qm, s0), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(A @ s0 + M, sT, atol=1e-12, rtol=1e-12)


def test_bad_arguments_are_clear_errors():
    from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

    q, k, v, beta, gate, _ = (None if x is None else x.detach() for x in _inputs(1, 8, 2, 4, 4, "gdn"))
    cases = [
        (dict(beta=beta * 3), r"beta values must be in \(0, 2\]; \d+ are not"),
        (dict(beta=beta - 2), r"beta values must be in \(0, 2\]"),
        (dict(beta=beta[..., 0]), r"beta must be \[B, T, H\] = \[1, 8, 2\], got \[1, 8\]"),
        (dict(beta=beta, log_decay=torch.zeros(2, dtype=torch.float64)), "not log_decay: pass gate="),
        (dict(beta=beta, causal=False), "the delta rule needs causal=True"),
        (dict(beta=beta, kernel=TritonChunkKernel()), "the 'triton' kernel has no delta rule"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            linear_attn(q, k, v, **kw)
    with pytest.raises(ValueError, match="no right-product form to ring"):
        ring_linear_attn(q, k, v, beta=beta)
    with pytest.raises(TypeError, match="beta must be a tensor"):
        lasp2_linear_attn(q, k, v, beta=0.5)


def test_bfloat16_inputs_keep_a_float32_chain():
    """bf16 activations: the blocks and the chain run in float32 (the state dtype), the output comes back in
    bf16 and follows the float64 recurrence to bf16's precision; the final state is float32."""
    q, k, v, beta, gate, s0 = (x.detach() for x in _inputs(1, 300, 2, 16, 16, "gdn"))
    o, sT = linear_attn(
        *(x.bfloat16() for x in (q, k, v)),
        beta=beta.bfloat16(),
        gate=gate.bfloat16(),
        initial_state=s0.float(),
        output_final_state=True,
    )
    assert o.dtype == torch.bfloat16 and sT.dtype == torch.float32
    rounded = [x.bfloat16().double() for x in (q, k, v, beta, gate)]
    o_ref, sT_ref = recurrent_delta_rule(*rounded[:4], gate=rounded[4], initial_state=s0)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-2 * float(o_ref.abs().max()), rtol=0)
    torch.testing.assert_close(sT.double(), sT_ref, atol=1e-4 * float(sT_ref.abs().max()), rtol=0)
