"""Mixture-of-Memories (lasp.model.mom) on one device, float64, against a token-by-token reference written here from
the paper's equations (arXiv 2502.13685): the router's top k memories of a token, renormalised; each memory's
state updated only by its tokens (Gated DeltaNet's or GLA's rule); the output the weighted sum of the token's
memories' read-outs, the shared memory at weight 1. The layer's output and every gradient, the router's
included. (Across ranks: tests/test_parallel.py.)"""

import pytest
import torch

from lasp.kernels.documents import Documents
from lasp.model import ModelConfig
from lasp.model.llama import DeltaNetAttention, LinearAttention

B, T = 2, 37


def layer(base: str, shared: bool):
    cfg = ModelConfig(
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        linear_variant=base,
        mom_num_memories=4,
        mom_top_k=2,
        mom_shared_memory=shared,
        layer_pattern="L",
        num_layers=1,
    )
    torch.manual_seed(3)
    mixer = (DeltaNetAttention if base == "gated_deltanet" else LinearAttention)(cfg, 0).double()
    with torch.no_grad():
        mixer.router.proj.weight.mul_(8)  # routes that differ from token to token
    return mixer


def reference(mixer, x, positions, resets):
    """The layer's output before o_proj, token by token: S[b, h, m] per memory m."""
    M, H, D = mixer.router.copies, mixer.num_heads, mixer.head_dim
    scores = torch.softmax(mixer.router.proj(x), -1)
    top, chosen = scores.topk(2, dim=-1)
    w = torch.zeros_like(scores).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
    routed = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)
    if mixer.router.shared:
        w = torch.cat([w, torch.ones_like(w[..., :1])], -1)
        routed = torch.cat([routed, torch.ones_like(routed[..., :1])], -1)
    delta = isinstance(mixer, DeltaNetAttention)
    if delta:
        q, k, v, beta, g = mixer.mixed(x, positions)
        g = g.unflatten(2, (H, M))[..., None]  # [B, T, H, M, 1]: one gate per memory head
        beta = beta.unflatten(2, (H, M))
    else:
        _, _, v, q, k, g = mixer.linear_inputs(x, positions)
        g = g.unflatten(2, (H, M))  # [B, T, H, M, D]
    k, v = (y.unflatten(2, (-1, M)).repeat_interleave(H // (y.shape[2] // M), dim=2) for y in (k, v))
    S = x.new_zeros(B, H, M, D, D)
    out = []
    for t in range(T):
        S = S * ~resets[:, t, None, None, None, None]  # a document start empties every memory
        r = routed[:, t, None, :]  # [B, 1, M]: a memory not routed to keeps its state
        decay = torch.where(r[..., None], torch.exp(g[:, t]), torch.ones_like(g[:, t]))
        S = S * decay[..., None]
        kt, vt = k[:, t], v[:, t]
        if delta:  # S += beta k (v - k^T S)^T
            err = vt - torch.einsum("bhmk,bhmkv->bhmv", kt, S)
            update = beta[:, t, ..., None, None] * kt[..., None] * err[..., None, :]
        else:  # S += k v^T
            update = kt[..., None] * vt[..., None, :]
        S = S + torch.where(r[..., None, None], update, torch.zeros_like(update))
        read = D**-0.5 * torch.einsum("bhk,bhmkv->bhmv", q[:, t], S)
        out.append(torch.einsum("bhmv,bm->bhv", read, w[:, t]))
    o = torch.stack(out, 1)
    return mixer.gated(o, x) if delta else mixer.out_norm(o)


@pytest.mark.parametrize("base, shared, documents", [("gated_deltanet", True, True), ("gla", False, False)])
def test_the_layer_follows_the_papers_recurrence_with_every_gradient(base, shared, documents):
    mixer = layer(base, shared)
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    positions = torch.arange(T).expand(B, T)
    docs = Documents([[0, 9, 10], [0, 30]], T) if documents else None
    resets = docs.resets() if documents else torch.zeros(B, T, dtype=torch.bool)
    if documents:
        positions = docs.positions()
    got = mixer.attend(x, positions, docs)
    want = reference(mixer, x, positions, resets)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = dict(mixer.named_parameters())
    do = torch.randn(got.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    g_got = torch.autograd.grad((got * do).sum(), list(params.values()), allow_unused=True)
    g_want = torch.autograd.grad((want * do).sum(), list(params.values()), allow_unused=True)
    used = 0
    for name, a, b in zip(params, g_got, g_want):
        if b is None:  # o_proj (after attend) and the softmax teacher's q/k norms take no part
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")
        used += 1
    assert params["router.proj.weight"].grad is None and g_got[list(params).index("router.proj.weight")].abs().max() > 0
    assert used >= 6


def test_bad_mom_settings_are_named_at_once():
    with pytest.raises(ValueError) as e:
        ModelConfig(linear_variant="kda", mom_num_memories=2, mom_top_k=3, window=2, gate_source="key")
    for part in (
        "model.mom_top_k must be in [2, model.mom_num_memories = 2], got 3",
        "needs model.linear_variant gla or gated_deltanet",
        "model.mom_num_memories needs model.gate_source projection",
        "cannot be combined with model.window (2)",
    ):
        assert part in str(e.value)
    with pytest.raises(ValueError, match="the router would get no gradient"):
        ModelConfig(linear_variant="gla", mom_num_memories=3, mom_top_k=1)
