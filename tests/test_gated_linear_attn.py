"""Gated linear attention on one device (scalar and vector log-gates) against the token recurrence."""

import pytest
import torch

from lasp import linear_attn
from lasp.kernels import TorchChunkKernel, recurrent_linear_attn
from lasp.kernels.linear_attn.gated import gate_grad
from lasp.kernels.protocol import Capabilities

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=3e-5, rtol=3e-5)}


def _inputs(B, T, H, K, V, dtype, form, Hkv=None, seed=0, strength=0.5):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    gshape = (B, T, H) if form == "scalar" else (B, T, H, K)
    # a different strength per head, from almost none to strong forgetting
    per_head = torch.linspace(0.01, 1.0, H, dtype=torch.float64).view(1, 1, H, *([1] * (len(gshape) - 3)))
    gate = (-torch.rand(gshape, generator=g, dtype=torch.float64) * strength * per_head * 2).to(dtype)
    return mk(B, T, H, K), mk(B, T, Hkv, K), mk(B, T, Hkv, V), gate.requires_grad_(), mk(B, H, K, V)


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("form", ["scalar", "vector"])
@pytest.mark.parametrize("T", [1, 13, 77])
@pytest.mark.parametrize("block", [4, 64])
def test_matches_recurrence(T, form, dtype, block):
    q, k, v, gate, s0 = _inputs(2, T, 3, 6, 5, dtype, form)
    kern = TorchChunkKernel(block=block, segment_blocks=2)
    o, sT = linear_attn(q, k, v, gate=gate, initial_state=s0, output_final_state=True, kernel=kern, scale=0.4)
    ins = [q, k, v, gate, s0]
    ref_ins = [x.detach().double().requires_grad_() for x in ins]  # the truth, in float64
    o_ref, sT_ref = recurrent_linear_attn(*ref_ins[:3], scale=0.4, initial_state=ref_ins[4], gate=ref_ins[3])
    torch.testing.assert_close(o, o_ref.to(dtype), **TOL[dtype])
    torch.testing.assert_close(sT, sT_ref.to(sT.dtype), **TOL[dtype])
    for name, got, want in zip("q k v gate s0".split(), _grads([o, sT], ins), _grads([o_ref, sT_ref], ref_ins)):
        # dgate sums T terms per token: float32 loses a little more there
        tol = dict(atol=1e-4, rtol=1e-4) if name == "gate" and dtype == torch.float32 else TOL[dtype]
        torch.testing.assert_close(got, want.to(dtype), **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("form", ["scalar", "vector"])
def test_gqa_without_states_and_output_only(form):
    q, k, v, gate, _ = _inputs(1, 37, 4, 4, 6, torch.float64, form, Hkv=2)
    o = linear_attn(q, k, v, gate=gate, kernel=TorchChunkKernel(block=8))
    kx, vx = (x.repeat_interleave(2, dim=2) for x in (k, v))
    o_ref, _ = recurrent_linear_attn(q, kx, vx, gate=gate)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float64])
    for got, want in zip(_grads([o], [q, k, v, gate]), _grads([o_ref], [q, k, v, gate])):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_gradcheck_small():
    for form in ("scalar", "vector"):
        q, k, v, gate, s0 = _inputs(1, 9, 2, 3, 4, torch.float64, form)
        kern = TorchChunkKernel(block=4, segment_blocks=1)
        fn = lambda q, k, v, g, s0: linear_attn(  # noqa: E731
            q, k, v, gate=g, initial_state=s0, output_final_state=True, kernel=kern
        )
        assert torch.autograd.gradcheck(fn, (q, k, v, gate, s0))


def test_gate_of_zero_is_no_decay_and_constant_gate_is_log_decay():
    q, k, v, gate, s0 = _inputs(2, 50, 3, 4, 4, torch.float64, "scalar")
    decay = torch.tensor([-0.05, -0.7, 0.0], dtype=torch.float64)
    const = decay.view(1, 1, 3).expand(2, 50, 3).contiguous()
    got = linear_attn(q, k, v, gate=const, initial_state=s0)
    want = linear_attn(q, k, v, log_decay=decay, initial_state=s0)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    vec = const[..., None].expand(2, 50, 3, 4).contiguous()
    torch.testing.assert_close(linear_attn(q, k, v, gate=vec, initial_state=s0), want, **TOL[torch.float64])


@pytest.mark.parametrize("form", ["scalar", "vector"])
def test_strong_gates_over_a_long_span_stay_finite_in_float32(form):
    """Cumulative gates of -3000 over a block: exp(-G) alone would overflow float32 (e^88)."""
    q, k, v, gate, _ = _inputs(1, 300, 2, 4, 4, torch.float32, form, strength=10.0)
    o = linear_attn(q, k, v, gate=gate)
    q64, k64, v64, g64 = (x.detach().double().requires_grad_() for x in (q, k, v, gate))
    o_ref, _ = recurrent_linear_attn(q64, k64, v64, gate=g64)
    torch.testing.assert_close(o, o_ref.float(), **TOL[torch.float32])
    grads = _grads([o], [q, k, v, gate])
    for got, want in zip(grads, _grads([o_ref], [q64, k64, v64, g64])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_gate_grad_of_the_final_state_alone():
    """d/dg of <dF, S_T> with S_T = Diag(exp(sum g)) S0: every token's gate gets sum_v dF * S_T."""
    B, T, H, K, V = 1, 5, 1, 2, 3
    S0 = torch.randn(B, H, K, V, dtype=torch.float64)
    dF = torch.randn(B, H, K, V, dtype=torch.float64)
    final = S0 * torch.exp(torch.tensor(-0.3 * T, dtype=torch.float64))
    zeros = torch.zeros(B, T, H, K, dtype=torch.float64)
    dg = gate_grad(zeros, zeros, zeros, zeros, zeros, dF, final)
    torch.testing.assert_close(dg, (dF * final).sum(-1)[:, None].expand(B, T, H, K))


def test_bad_gates_are_refused_with_every_problem():
    q, k, v, gate, _ = _inputs(1, 8, 2, 4, 4, torch.float32, "scalar")
    with pytest.raises(ValueError, match=r"gate must be \[B, T, H\] = \[1, 8, 2\].*either log_decay"):
        linear_attn(q, k, v, gate=gate[:, :5].detach(), log_decay=torch.zeros(2))
    with pytest.raises(ValueError, match="<= 0 and not NaN.*1 are not"):
        bad = gate.detach().clone()
        bad[0, 3, 1] = 0.5
        linear_attn(q, k, v, gate=bad)
    with pytest.raises(ValueError, match="a gate needs causal=True"):
        linear_attn(q, k, v, gate=gate.detach(), causal=False)
    with pytest.raises(TypeError, match="gate must be a tensor"):
        linear_attn(q, k, v, gate=[0.0])


def test_a_kernel_without_gates_is_named():
    class NoGates(TorchChunkKernel):
        name, caps = "triton", Capabilities()

    q, k, v, gate, _ = _inputs(1, 8, 2, 4, 4, torch.float32, "vector")
    with pytest.raises(ValueError, match="'triton' kernel has no vector gate.*use the 'torch' backend"):
        linear_attn(q, k, v, gate=gate.detach(), kernel=NoGates())


@pytest.mark.parametrize("span", [-1.0, 1e9], ids=["exact-weights", "factored"])
def test_both_forms_of_the_vector_gates_intra_block_weight(monkeypatch, span):
    """FACTOR_SPAN picks the form: -1 never factors (the [C, C, K] weight), 1e9 always does."""
    from lasp.kernels.linear_attn import gated

    monkeypatch.setattr(gated, "FACTOR_SPAN", span)
    q, k, v, gate, s0 = _inputs(2, 45, 3, 6, 5, torch.float64, "vector")
    o, sT = linear_attn(
        q,
        k,
        v,
        gate=gate,
        initial_state=s0,
        output_final_state=True,
        kernel=TorchChunkKernel(block=32, segment_blocks=1),
    )
    o_ref, sT_ref = recurrent_linear_attn(q, k, v, initial_state=s0, gate=gate)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float64])
    ins = [q, k, v, gate, s0]
    for got, want in zip(_grads([o, sT], ins), _grads([o_ref, sT_ref], ins)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
