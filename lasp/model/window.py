"""A sliding window of exact softmax attention beside a linear branch, under one normaliser (LoLCATs).

Legend: B batch, T local tokens, H query heads, G key/value heads (H = G r), D head dim, F feature dim,
W window, n chunks per rank (1 on one device), L tokens per chunk.

Query i attends to the keys j of its window (i - W, i] inside its document with softmax scores
e_ij = exp(q_i.k_j / sqrt(D) - m_i) (q, k RoPE'd, m_i the window's largest score), and to older keys through
the linear branch, l_ij = phi(q_i)^T Gamma(i, j) phi(k_j) (Gamma: the decay or gates between j and i):

    o_i = (sum_win e_ij v_j + exp(-m_i) sum_older l_ij v_j) / (sum_win e_ij + exp(-m_i) sum_older l_ij)

The linear op gives the sums over ALL keys (N, Z: values with a column of ones); this module computes the
window's part of them and takes it out, so the linear op (and LASP-2 over it) is unchanged. The window
reaches W - 1 rows back, into the chunk before (another rank's under sequence parallelism): `halo`
returns those rows (zeros on one device; lasp.sp.halo under SP).
"""

import torch
from torch import Tensor


def window_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, linear: Tensor, *, window: int,
                     positions: Tensor, halo, log_decay: Tensor | None = None, gate: Tensor | None = None) -> Tensor:
    """q [B, T, H, D], k, v [B, T, G, D] (q, k RoPE'd); fq [B, T, H, F], fk [B, T, G, F] the linear branch's
    features; linear [B, T, H, D + 1] the linear op over every key of (fq, fk, [v, 1]) with scale 1 and the
    same decay; positions [B, T] (within the document: a window stops at its start); log_decay [H] or a
    scalar gate [B, T, H]; halo(x [B, T, C], rows) -> [n, B, rows, C]. Returns o [B, T, H, D]."""
    B, T, H, D = q.shape
    G, F, W = k.shape[2], fk.shape[-1], window
    r = H // G
    parts = [k.flatten(2), v.flatten(2), fk.flatten(2)] + ([] if gate is None else [gate.to(k.dtype)])
    x = torch.cat(parts, -1)
    before = halo(x, W - 1)  # [n, B, W - 1, C]
    n = before.shape[0]
    ext = torch.cat([before.to(x.dtype), x.view(B, n, T // n, -1).transpose(0, 1)], dim=2)
    # slot w of token i's window holds token i - (W - 1) + w: a distance of W - 1 - w
    win = ext.unfold(2, W, 1).transpose(0, 1).reshape(B, T, -1, W)  # [B, T, C, W]
    kw, vw, fkw, *gw = win.split([G * D, G * D, G * F] + ([] if gate is None else [H]), dim=2)
    kw, vw, fkw = kw.unflatten(2, (G, D)), vw.unflatten(2, (G, D)), fkw.unflatten(2, (G, F))
    dist = torch.arange(W - 1, -1, -1, device=q.device)
    valid = (dist <= positions[..., None])[:, :, None, None, :]  # [B, T, 1, 1, W]
    qg, fqg = q.unflatten(2, (G, r)), fq.unflatten(2, (G, r))
    s = torch.einsum("btgrd,btgdw->btgrw", qg, kw) * D**-0.5
    lin = torch.einsum("btgrf,btgfw->btgrw", fqg, fkw)
    if log_decay is not None:
        lin = lin * torch.exp(dist.to(log_decay.dtype) * log_decay[:, None]).to(lin.dtype).view(G, r, W)
    if gate is not None:  # the gates of the tokens after each key, up to i: a reverse cumulative sum
        g = gw[0]  # [B, T, H, W]
        after = g.flip(-1).cumsum(-1).flip(-1) - g
        lin = lin * torch.exp(after).unflatten(2, (G, r))
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1)  # the window always holds the token itself
    e = torch.exp(s - m[..., None])
    lin = lin * valid
    num = torch.einsum("btgrw,btgdw->btgrd", e, vw)
    num_lin = torch.einsum("btgrw,btgdw->btgrd", lin, vw)
    full = linear.unflatten(2, (G, r))
    older = torch.exp(-m)
    out = (num + older[..., None] * (full[..., :D] - num_lin)) / \
        (e.sum(-1) + older * (full[..., D] - lin.sum(-1)))[..., None]
    return out.flatten(2, 3)
