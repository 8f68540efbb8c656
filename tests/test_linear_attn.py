"""Single-device linear attention: chunked kernel and autograd against the token recurrence."""

import pytest
import torch

from lasp import linear_attn
from lasp.kernels import TorchChunkKernel, quadratic_linear_attn, recurrent_linear_attn

DECAY = torch.tensor([-0.05, -0.7, 0.0])
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def _inputs(B, T, H, K, V, dtype, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv = H if Hkv is None else Hkv
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, T, H, K), mk(B, T, Hkv, K), mk(B, T, Hkv, V), mk(B, H, K, V)


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["causal", "decay", "bidirectional"])
@pytest.mark.parametrize("T", [1, 13, 64, 100, 333])
@pytest.mark.parametrize("block", [16, 64])
def test_matches_recurrence(T, mode, dtype, block):
    causal, decay = mode != "bidirectional", DECAY if mode == "decay" else None
    q, k, v, s0 = _inputs(2, T, 3, 8, 5, dtype)
    kern = TorchChunkKernel(block=block, segment_blocks=2)
    o, sT = linear_attn(q, k, v, log_decay=decay, causal=causal, initial_state=s0, output_final_state=True, kernel=kern)
    o_ref, sT_ref = recurrent_linear_attn(q, k, v, decay, causal, None, s0)
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    torch.testing.assert_close(sT, sT_ref, **TOL[dtype])
    for got, want in zip(_grads([o, sT], [q, k, v, s0]), _grads([o_ref, sT_ref], [q, k, v, s0])):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("decay", [None, DECAY[:2]], ids=["nodecay", "decay"])
def test_gqa_and_no_state(decay):
    q, k, v, _ = _inputs(1, 37, 2 if decay is not None else 4, 4, 6, torch.float64, Hkv=1)
    o = linear_attn(q, k, v, log_decay=decay)
    kx, vx = (x.repeat_interleave(q.shape[2], dim=2) for x in (k, v))
    o_ref, _ = recurrent_linear_attn(q, kx, vx, decay)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    for got, want in zip(_grads([o], [q, k, v]), _grads([o_ref], [q, k, v])):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_gradcheck_small():
    q, k, v, s0 = _inputs(1, 9, 2, 3, 4, torch.float64)
    kern = TorchChunkKernel(block=4, segment_blocks=1)
    fn = (
        lambda q, k, v, s0: linear_attn(  # noqa: E731
            q, k, v, log_decay=DECAY[:2], initial_state=s0, output_final_state=True, kernel=kern
        )
    )
    assert torch.autograd.gradcheck(fn, (q, k, v, s0))


def test_quadratic_form_matches():
    q, k, v, _ = _inputs(1, 50, 3, 4, 4, torch.float64)
    o_ref, _ = recurrent_linear_attn(q, k, v, DECAY)
    torch.testing.assert_close(quadratic_linear_attn(q, k, v, DECAY), o_ref, atol=1e-10, rtol=1e-10)


def test_half_precision_keeps_dtype_and_float32_state():
    q, k, v, _ = _inputs(1, 70, 3, 8, 8, torch.bfloat16)
    o, sT = linear_attn(q, k, v, log_decay=DECAY, output_final_state=True)
    assert o.dtype == torch.bfloat16 and sT.dtype == torch.float32
    o_ref, sT_ref = recurrent_linear_attn(*(x.detach().double() for x in (q, k, v)), DECAY)
    torch.testing.assert_close(o.double(), o_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(sT.double(), sT_ref, atol=1e-4, rtol=1e-4)
    _grads([o], [q, k, v])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k_shape=(1, 8, 3, 4)), "batch and length"),
        (dict(k_shape=(1, 9, 3, 5)), "same head dim"),
        (dict(k_shape=(1, 9, 2, 4), v_shape=(1, 9, 2, 4)), r"q heads \(3\) must be a multiple"),
        (dict(decay=torch.tensor([-0.1, 0.2, 0.0])), r"<= 0.*0\.2"),
        (dict(decay=torch.tensor([-0.1, -0.2])), r"shape \[H\] = \[3\]"),
        (dict(decay=torch.tensor([-0.1, -0.2, -0.3]), causal=False), "causal=True"),
        (dict(decay=torch.tensor([-0.1, -0.2, -0.3], requires_grad=True)), "no grad"),
        (dict(s0_shape=(1, 3, 4, 5)), r"initial_state must be \[B, H, K, V\] = \[1, 3, 4, 4\]"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    q = torch.randn(1, 9, 3, 4)
    k = torch.randn(*kwargs.get("k_shape", (1, 9, 3, 4)))
    v = torch.randn(*kwargs.get("v_shape", (1, 9, k.shape[2], 4)))
    s0 = torch.randn(*kwargs["s0_shape"]) if "s0_shape" in kwargs else None
    with pytest.raises(ValueError, match=match):
        linear_attn(q, k, v, log_decay=kwargs.get("decay"), causal=kwargs.get("causal", True), initial_state=s0)


def test_decay_values_are_checked_at_every_call():
    """No cache to fool: a change in place, or a write through .data (which does not bump the tensor's
    version), is seen at the next call."""
    q = torch.randn(1, 9, 3, 4)
    g = torch.tensor([-0.1, -0.2, -0.3])
    linear_attn(q, q, q, log_decay=g)
    g[1] = 0.5
    with pytest.raises(ValueError, match=r"<= 0.*0\.5"):
        linear_attn(q, q, q, log_decay=g)
    g[1] = -0.2
    linear_attn(q, q, q, log_decay=g)
    version = g._version
    g.data[2] = float("nan")
    assert g._version == version
    with pytest.raises(ValueError, match="finite"):
        linear_attn(q, q, q, log_decay=g)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(causal="false"), TypeError, r"causal must be True or False, got 'false' \(str\)"),
        (dict(causal=1), TypeError, r"causal must be True or False, got 1 \(int\)"),
        (dict(log_decay=-0.5), TypeError, r"log_decay must be a tensor of shape \[H\] = \[3\].*got float -0.5"),
        (dict(log_decay=[-0.1, -0.2, -0.3]), TypeError, r"log_decay must be a tensor.*got list"),
        (dict(log_decay=torch.tensor([-1, -2, -3])), ValueError, "log_decay must be a floating-point tensor"),
        (dict(scale=0.0), ValueError, r"scale must be a finite number > 0 .* got 0.0"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite number > 0"),
        (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a number or None"),
    ],
)
def test_bad_arguments_are_refused_by_type(kwargs, err, match):
    q = torch.randn(1, 9, 3, 4)
    with pytest.raises(err, match=match):
        linear_attn(q, q, q, **kwargs)


@pytest.mark.parametrize("name", ["lasp2_linear_attn", "lasp1_linear_attn", "ulysses_linear_attn"])
def test_without_process_group_the_sp_ops_check_as_on_a_group(name):
    """The single-device fallback refuses what the distributed path refuses."""
    import lasp

    fn = getattr(lasp, name)
    q = torch.randn(1, 7, 3, 4)
    with pytest.raises(ValueError, match=r"local length 7 .* zigzag layout over 1 ranks"):
        fn(q, q, q, layout="zigzag")
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        fn(q, q, q, layout="ring")
    with pytest.raises(TypeError, match="causal must be True or False"):
        fn(q, q, q, causal=None)
    with pytest.raises(TypeError, match="log_decay must be a tensor"):
        fn(q, q, q, log_decay=-0.1)
