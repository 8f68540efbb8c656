"""DeltaProduct (householder = n delta-rule steps per token) on one device: against flash-linear-attention's own
reference (fla/ops/gated_delta_product/naive.py, loaded by file path: fla's package imports Triton kernels) and
against lasp's token recurrence, float64: outputs, final states, every gradient, documents. (Across ranks:
tests/test_sp_gated.py.)"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lasp import linear_attn
from lasp.kernels.linear_attn.naive import recurrent_delta_product


def fla_naive():
    """fla's naive_recurrent_gated_delta_product, from the installed fla-core's file."""
    spec = importlib.util.find_spec("fla")  # finds the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "ops" / "gated_delta_product" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_gated_delta_product_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.naive_recurrent_gated_delta_product


def inputs(B, T, H, K, V, n, gated, seed=0):
    """float64 tensors whose values are float32 numbers (fla's reference casts q, k, v, beta to float32, so
    exact float32 inputs lose nothing), k L2-normalised per micro-step, beta in (0.1, 2)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).double()  # noqa: E731
    q, v, s0 = rnd(B, T, H, K), rnd(B, T * n, H, V), rnd(B, H, K, V)
    k = F.normalize(torch.randn(B, T * n, H, K, generator=g), dim=-1).double()
    beta = (torch.rand(B, T * n, H, generator=g) * 1.9 + 0.1).double()
    gate = -(torch.rand(B, T, H, generator=g) * 0.6).double() if gated else None
    return q, k, v, beta, gate, s0


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("gated", [True, False])
def test_matches_flash_linear_attentions_reference(n, gated):
    q, k, v, beta, gate, s0 = inputs(2, 37, 3, 8, 5, n, gated)
    o, S = linear_attn(q, k, v, beta=beta, gate=gate, householder=n, initial_state=s0, output_final_state=True)
    # a float64 initial state keeps fla's chain in float64; it stores the outputs in float32
    o_fla, S_fla = fla_naive()(q, k, v, gate, beta, 8**-0.5, None, initial_state=s0.clone(), num_householder=n)
    assert S_fla.dtype == torch.float64
    torch.testing.assert_close(S, S_fla, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o, o_fla.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, gated, T", [(2, True, 37), (3, False, 29), (4, True, 1)])
def test_every_gradient_matches_the_recurrence(n, gated, T):
    ins = [None if x is None else x.requires_grad_() for x in inputs(1, T, 2, 6, 4, n, gated, seed=n)]
    q, k, v, beta, gate, s0 = ins
    o, S = linear_attn(q, k, v, beta=beta, gate=gate, householder=n, initial_state=s0, output_final_state=True)
    o_ref, S_ref = recurrent_delta_product(q, k, v, beta, n, gate=gate, initial_state=s0)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    gen = torch.Generator().manual_seed(7)
    do, dS = torch.randn(o.shape, generator=gen).double(), torch.randn(S.shape, generator=gen).double()
    live = [x for x in ins if x is not None]
    got = torch.autograd.grad((o * do).sum() + (S * dS).sum(), live)
    want = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), live)
    for name, a, b in zip(["q", "k", "v", "beta", "gate", "s0"] if gated else ["q", "k", "v", "beta", "s0"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_documents_reset_the_state_at_their_first_token():
    q, k, v, beta, gate, _ = inputs(2, 23, 2, 6, 4, 2, True, seed=3)
    cu = [[0, 1, 9, 22], [0, 12]]
    o = linear_attn(q, k, v, beta=beta, gate=gate, householder=2, cu_seqlens=cu)
    o_ref, _ = recurrent_delta_product(q, k, v, beta, 2, gate=gate, cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    # the second document of row 1 does not see the first
    alone = linear_attn(
        *(x[1:, 12 * m :] for x, m in ((q, 1), (k, 2), (v, 2))), beta=beta[1:, 24:], gate=gate[1:, 12:], householder=2
    )
    torch.testing.assert_close(o[1:, 12:], alone, rtol=1e-10, atol=1e-10)


def test_bad_arguments_are_clear_errors():
    q, k, v, beta, gate, _ = inputs(1, 5, 2, 4, 4, 2, True)
    with pytest.raises(ValueError, match="householder must be an int >= 1"):
        linear_attn(q, k, v, beta=beta, gate=gate, householder=0)
    with pytest.raises(ValueError) as e:
        linear_attn(q, k[:, :9], v[:, :9], gate=gate[:, :4], householder=2)
    for part in (
        "needs the delta rule",
        "k must hold T * 2 = 10 rows",
        "v must hold",
        "the gate is one per token, T = 5",
    ):
        assert part in str(e.value)
