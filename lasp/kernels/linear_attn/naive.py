"""Plain references for linear attention: the token recurrence (ground truth) and the quadratic form.

Legend: B batch, T tokens, H heads, K key dim, V value dim.
Both take expanded heads (q, k, v with the same H) and use plain autograd. They are slow on purpose:
tests compare the chunked kernel against `recurrent_linear_attn`, and the CPU benchmark uses
`quadratic_linear_attn` as the baseline the chunked path must beat.
"""

import torch
from torch import Tensor

from lasp.kernels.documents import as_documents
from lasp.kernels.protocol import state_dtype


def recurrent_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    gate: Tensor | None = None,
    cu_seqlens=None,
) -> tuple[Tensor, Tensor]:
    """S_t = lambda S_{t-1} + k_t v_t^T, o_t = s q_t^T S_t, token by token -> (o [B,T,H,V], S [B,H,K,V]).

    `gate` (log-gates [B,T,H] or [B,T,H,K], instead of log_decay): S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T.
    `cu_seqlens` (see lasp.kernels.documents): S_{t-1} is dropped at every document start t > 0.

    Non-causal: o_t = s q_t^T (S0 + sum_j k_j v_j^T) for every t, no decay.
    """
    B, T, H, K = q.shape
    dt = state_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    lam = None if log_decay is None else torch.exp(log_decay.to(dt))[None, :, None, None]
    if not causal:
        S = S + torch.einsum("bthk,bthv->bhkv", kf, vf)
        return (scale * torch.einsum("bthk,bhkv->bthv", qf, S)).to(q.dtype), S
    outs = []
    g = None if gate is None else (gate if gate.dim() == 4 else gate[..., None]).to(dt)
    keep = None if cu_seqlens is None else ~as_documents(cu_seqlens, B, T).resets(q.device)
    for t in range(T):
        if keep is not None:
            S = S * keep[:, t, None, None, None]
        if g is not None:
            S = torch.exp(g[:, t])[..., None] * S
        S = (S if lam is None else lam * S) + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    return torch.stack(outs, dim=1).to(q.dtype), S


def recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    gate: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens=None,
) -> tuple[Tensor, Tensor]:
    """The delta rule token by token (flash-linear-attention's convention) -> (o [B,T,H,V], S [B,H,K,V]):
    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T, o_t = s q_t^T S_t, with beta [B,T,H]
    and the log-gate [B,T,H] (Gated DeltaNet), [B,T,H,K] (KDA) or None (DeltaNet). A gate of -inf and a
    document start of `cu_seqlens` drop S_{t-1}."""
    B, T, H, K = q.shape
    dt = state_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, bf = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    g = None if gate is None else (gate if gate.dim() == 4 else gate[..., None]).to(dt)
    keep = None if cu_seqlens is None else ~as_documents(cu_seqlens, B, T).resets(q.device)
    outs = []
    for t in range(T):
        if keep is not None:
            S = S * keep[:, t, None, None, None]
        if g is not None:
            S = torch.exp(g[:, t])[..., None] * S
        kt = kf[:, t]  # [B, H, K]
        new = vf[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + bf[:, t, :, None, None] * kt[..., None] * new[:, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    return torch.stack(outs, dim=1).to(q.dtype), S


def recurrent_delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    householder: int,
    gate: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens=None,
) -> tuple[Tensor, Tensor]:
    """DeltaProduct token by token -> (o [B,T,H,V], S [B,H,K,V]): for each token t, S = Diag(exp(g_t)) S (the
    log-gate [B,T,H] or None), then for j < n: S = S + b_tj k_tj (v_tj - k_tj^T S)^T, then o_t = s q_t^T S;
    k, v, beta with n rows per token ([B, T * n, ...]). A document start of `cu_seqlens` (over the T tokens)
    drops S before the token."""
    B, T, H, K = q.shape
    n, dt = householder, state_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, bf = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    keep = None if cu_seqlens is None else ~as_documents(cu_seqlens, B, T).resets(q.device)
    outs = []
    for t in range(T):
        if keep is not None:
            S = S * keep[:, t, None, None, None]
        if gate is not None:
            S = torch.exp(gate[:, t].to(dt))[..., None, None] * S
        for j in range(t * n, t * n + n):
            new = vf[:, j] - torch.einsum("bhk,bhkv->bhv", kf[:, j], S)
            S = S + bf[:, j, :, None, None] * kf[:, j, ..., None] * new[:, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    return torch.stack(outs, dim=1).to(q.dtype), S


def quadratic_linear_attn(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Causal o = s ((q k^T) * decay mask) v, materialising the T x T matrix per head -> [B,T,H,V]."""
    T, K = q.shape[1], q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt = state_dtype(q.dtype)
    i = torch.arange(T, device=q.device)
    diff = (i[:, None] - i[None, :]).to(dt)
    if log_decay is None:
        mask = (diff >= 0).to(dt)[None]
    else:
        expo = log_decay.to(dt)[:, None, None] * diff
        mask = torch.exp(torch.where(diff >= 0, expo, torch.full((), -torch.inf, dtype=dt)))
    scores = torch.einsum("bihk,bjhk->bhij", q.to(dt), k.to(dt)) * mask
    return (scale * torch.einsum("bhij,bjhv->bihv", scores, v.to(dt))).to(q.dtype)
