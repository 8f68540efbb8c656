"""The delta rule (DeltaNet, Gated DeltaNet, KDA), chunked and vectorised in PyTorch: the CPU path.

Legend: B batch, T tokens, H heads, K key dim, V value dim, n blocks of L tokens, Kg gate width (1: a
scalar gate per token and head, Gated DeltaNet; K: a vector gate, KDA).

flash-linear-attention's conventions (DESIGN.md section 1, "Beyond constant decay"):

    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T ,   o_t = scale * q_t^T S_t

with b_t = beta in (0, 2] and g_t <= 0 the log-gate (none: DeltaNet; a scalar commutes, so this is also
Gated DeltaNet's a_t (I - b_t k_t k_t^T) S_{t-1} + ...). q and k are used as given (the layer normalises).

Inside a block, with G_t = g_1 + ... + g_t from the block's start and S_0 the incoming state, every
state is S_t = Diag(exp(G_t)) S_0 + sum_{s<=t} Diag(exp(G_t - G_s)) k_s u_s^T, whose "new values" u solve
the unit lower-triangular system of the WY / UT form (Yang et al., "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"; fla/ops/delta_rule/wy_fast.py):

    (I + A) u = b v - (b exp(G) k) S_0 ,  A_ts = b_t sum_k k_tk k_sk exp(G_tk - G_sk)  (s < t)

so u = U0 - W S_0 with U0 = (I + A)^-1 (b v), W = (I + A)^-1 (b exp(G) k), and the block is an affine map
of S_0 in its output and its state (`block_pieces`):

    o     = P U0 + Qm S_0                 P_ts = scale q_t . (k_s exp(G_t - G_s)), s <= t;  Qm = scale q exp(G) - P W
    S_out = (Diag(exp(G_L)) - Kt^T W) S_0 + Kt^T U0      Kt_s = k_s exp(G_L - G_s)

Every exponent is <= 0 (the [L, L] or, for a vector gate, [L, L, K] pairwise weight is masked before its
exp), so nothing overflows; blocks are 64 tokens, 16 for a vector gate. A log-gate of -inf (a document
start) counts as 0 in G, and a segment id per token masks every pairwise weight to one document, drops
S_0's terms after a start and keeps only the block's last document in the state. Across blocks one scan
of K x K transitions (`chain`) gives every block's S_0; the same scan from (I, 0) gives the maps of a
whole chunk (`chunk_maps`), which is what LASP-2 all-gathers.

The backward (`delta_backward`) recomputes the forward of the call with autograd and differentiates it: the
saved tensors are the inputs, the live graph is linear in T (the pieces above, one K x K transition per
block), and nothing of size T x K x K exists.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from lasp.kernels.protocol import state_dtype

BLOCK = 64
VECTOR_BLOCK = 16  # a vector gate's pairwise weight is [L, L, K]


def _blocks(x: Tensor, L: int) -> Tensor:
    """[B, T, H, ...] -> [B, H, n, L, ...], zero-padded at the end (a zero token changes nothing: k = 0
    writes nothing, b = 0 adds nothing, a log-gate of 0 keeps the state)."""
    T = x.shape[1]
    pad = -T % L
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
    x = x.unflatten(1, (-1, L))  # [B, n, L, H, ...]
    return x.movedim(3, 1)


def _unblocks(x: Tensor, T: int) -> Tensor:
    """[B, H, n, L, D] -> [B, T, H, D]."""
    return x.movedim(1, 3).flatten(1, 2)[:, :T]


def block_pieces(q, k, v, beta, gate, scale: float, L: int):
    """Every block's affine map, from blocked inputs q, k [B, H, n, L, K], v [B, H, n, L, V], beta
    [B, H, n, L], gate [B, H, n, L, Kg] or None: (o0 [.., L, V], Qm [.., L, K], A [.., K, K], M [.., K, V])
    with o = o0 + Qm S_0 and S_out = A S_0 + M (module doc)."""
    idx = torch.arange(L, device=q.device)
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    if gate is None:
        same = incl.to(q.dtype)  # [L, L]
        qk = (q @ k.transpose(-1, -2)) * same
        kk = (k @ k.transpose(-1, -2)) * (strict.to(q.dtype))
        eG = kt = None
        start_free = None
    else:
        reset = torch.isneginf(gate[..., 0])  # [B, H, n, L]: a document starts here
        g = gate.masked_fill(reset[..., None], 0.0)
        G = g.cumsum(-2)  # [.., L, Kg]
        seg = reset.to(torch.int32).cumsum(-1)
        one_doc = seg[..., :, None] == seg[..., None, :]  # [.., L, L]
        if gate.shape[-1] == 1:
            diff = (G[..., :, None, 0] - G[..., None, :, 0]).masked_fill(~incl, -torch.inf)
            w = torch.exp(diff) * one_doc
            qk = (q @ k.transpose(-1, -2)) * w
            kk = (k @ k.transpose(-1, -2)) * w * strict
        else:
            diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~incl[..., None], -torch.inf)
            w = torch.exp(diff) * one_doc[..., None]  # [.., L, L, K]
            qk = torch.einsum("...tk,...sk,...tsk->...ts", q, k, w)
            kk = torch.einsum("...tk,...sk,...tsk->...ts", k, k, w) * strict
        start_free = (seg == 0)[..., None]  # no start since the block's beginning: S_0 still counts
        eG = torch.exp(G) * start_free
        last = seg[..., -1:]
        kt = k * torch.exp(G[..., -1:, :] - G) * (seg == last)[..., None]
    qk = qk * scale
    A = kk * beta[..., :, None]
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * (k if eG is None else k * eG)], dim=-1)
    sol = torch.linalg.solve_triangular(A + torch.eye(L, dtype=A.dtype, device=A.device), rhs, upper=False,
                                        unitriangular=True)
    U0, W = sol[..., : v.shape[-1]], sol[..., v.shape[-1]:]
    o0 = qk @ U0
    Qm = scale * (q if eG is None else q * eG) - qk @ W
    kt = k if kt is None else kt
    Kdim = k.shape[-1]
    if gate is None:
        decay = torch.eye(Kdim, dtype=q.dtype, device=q.device)
    else:
        eL = (torch.exp(G[..., -1, :]) * start_free[..., -1, :]).expand(*G.shape[:-2], Kdim)
        decay = torch.diag_embed(eL)
    A_blk = decay - kt.transpose(-1, -2) @ W
    M_blk = kt.transpose(-1, -2) @ U0
    return o0, Qm, A_blk, M_blk


def chain(A: Tensor, M: Tensor, s0: Tensor | None) -> tuple[Tensor, Tensor]:
    """S_0 of every block, [B, H, n, K, V], and the final state: S_{j+1} = A_j S_j + M_j from s0 (None:
    zero)."""
    n = A.shape[2]
    S = torch.zeros_like(M[:, :, 0]) if s0 is None else s0
    states = []
    for j in range(n):
        states.append(S)
        S = A[:, :, j] @ S + M[:, :, j]
    return torch.stack(states, 2), S


def _prepare(q, k, v, beta, gate):
    dt = state_dtype(q.dtype)
    L = VECTOR_BLOCK if gate is not None and gate.shape[-1] > 1 else BLOCK
    L = min(L, max(q.shape[1], 1))
    blocked = [_blocks(x.to(dt), L) for x in (q, k, v)]
    b = _blocks(beta.to(dt)[..., None], L)[..., 0]
    g = None if gate is None else _blocks(gate.to(dt), L)
    return blocked, b, g, L


def delta_forward(q, k, v, beta, gate, scale: float, s0: Tensor | None) -> tuple[Tensor, Tensor]:
    """The delta rule over T from s0 [B, H, K, V] (None: zero) -> (o [B, T, H, V] in the state dtype, final
    state [B, H, K, V]). Differentiable by autograd (`delta_backward` runs it again under it)."""
    (qb, kb, vb), b, g, L = _prepare(q, k, v, beta, gate)
    o0, Qm, A, M = block_pieces(qb, kb, vb, b, g, scale, L)
    states, final = chain(A, M, None if s0 is None else s0.to(qb.dtype))
    return _unblocks(o0 + Qm @ states, q.shape[1]), final


def chunk_maps(q, k, v, beta, gate, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole chunk as an affine map of its incoming state S_in: (o0 [B, T, H, V], Qm [B, T, H, K], A
    [B, H, K, K], M [B, H, K, V]) with o = o0 + Qm S_in and S_out = A S_in + M, in the state dtype. The
    chain runs on the state [P | S] from [I | 0]: P collects the transitions, S the zero-start state."""
    (qb, kb, vb), b, g, L = _prepare(q, k, v, beta, gate)
    o0, Qm, A, M = block_pieces(qb, kb, vb, b, g, scale, L)
    B, H, n, _, K = Qm.shape
    eye = torch.eye(K, dtype=M.dtype, device=M.device).expand(B, H, K, K)
    aug = torch.cat([torch.zeros_like(A), M], dim=-1)  # the transitions' own "values" are zero
    states, final = chain(A, aug, torch.cat([eye, torch.zeros_like(M[:, :, 0])], dim=-1))
    out = torch.cat([torch.zeros_like(Qm), o0], dim=-1) + Qm @ states
    T = q.shape[1]
    return _unblocks(out[..., K:], T), _unblocks(out[..., :K], T), final[..., :K], final[..., K:]


def delta_backward(q, k, v, beta, gate, scale: float, s0, do, dfinal, need_s0: bool):
    """(dq, dk, dv, dbeta, dgate or None, ds0 or None) of `delta_forward`, given do and the final state's
    gradient (or None), by differentiating its recomputation."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in (q, k, v, beta)]
        g = None if gate is None else gate.detach().requires_grad_()
        s = None if s0 is None else s0.detach().requires_grad_(need_s0)
        o, final = delta_forward(*xs, g, scale, s)
        outs, grads = [o], [do.to(o.dtype)]
        if dfinal is not None:
            outs.append(final)
            grads.append(dfinal.to(final.dtype))
        inputs = xs + ([g] if g is not None else []) + ([s] if s is not None and need_s0 else [])
        got = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
    got = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, got)]
    dq, dk, dv, db = (d.to(x.dtype) for d, x in zip(got[:4], (q, k, v, beta)))
    dg = got[4].to(gate.dtype) if gate is not None else None
    ds0 = got[-1] if s is not None and need_s0 else None
    return dq, dk, dv, db, dg, ds0
