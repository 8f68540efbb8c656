"""A sliding window of exact softmax attention beside a linear branch, under one normaliser (LoLCATs).

Legend: B batch, T local tokens, H query heads, G key/value heads (H = G r), D head dim, F feature dim,
W window, n chunks per rank (1 on one device), L tokens per chunk.

Query i attends to the keys j of its window (i - W, i] inside its document with softmax scores
e_ij = exp(q_i.k_j / sqrt(D) - m_i) (q, k RoPE'd, m_i the window's largest score), and to older keys through
the linear branch, l_ij = phi(q_i)^T Gamma(i, j) phi(k_j) (Gamma: the decay or gates between j and i),
each side weighted by a per-head share (w_h, 1 - w_h):

    o_i = (w sum_win e_ij v_j + (1 - w) sum_older l_ij v_j) / (w sum_win e_ij + (1 - w) sum_older l_ij)

as LoLCATs' hybrid attention: the linear scores are not rescaled by exp(-m_i), so the feature maps learn
their size against the window's max-normalised ones. The linear op gives the sums over ALL keys (values
with a column of ones: the normaliser); this module computes the window's part of them and takes it out, so
the linear op (and LASP-2 over it) is unchanged. The window reaches W - 1 rows back, into the chunk before
(another rank's under sequence parallelism): `halo` returns those rows (zeros on one device; lasp.sp.halo
under SP).
"""

import torch
from torch import Tensor


def _pairs(x: Tensor, W: int, nb: int) -> Tensor:
    """[n, B, W - 1 + L, ...] rows (a halo, then a chunk) -> [n, B, nb, 2W, ...]: for query block b (queries
    bW .. bW + W - 1 of the chunk), the rows bW .. bW + 2W - 1 (zero-padded past the end)."""
    pad = (nb + 1) * W - x.shape[2]
    x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2).unflatten(2, (nb + 1, W))
    return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    linear: Tensor,
    *,
    window: int,
    positions: Tensor,
    halo,
    share: Tensor,
    log_decay: Tensor | None = None,
    gate: Tensor | None = None,
) -> Tensor:
    """q [B, T, H, D], k, v [B, T, G, D] (q, k RoPE'd); fq [B, T, H, F], fk [B, T, G, F] the linear branch's
    features; linear [B, T, H, D + 1] the linear op over every key of (fq, fk, [v, 1]) with scale 1 and the
    same decay; positions [B, T] (within the document: a window stops at its start); halo(x [B, T, C],
    rows) -> [n, B, rows, C]; share [H] the window's weight w in (0, 1); log_decay [H] or a scalar gate
    [B, T, H]. Returns o [B, T, H, D].

    Queries go in blocks of W; block b's windows lie in the 2W rows from its first query's window start,
    so scores are [.., W, 2W] per block (banded, masked), never [T, T]."""
    B, T, H, D = q.shape
    G, F, W = k.shape[2], fk.shape[-1], window
    r = H // G
    parts = [k.flatten(2), v.flatten(2), fk.flatten(2)] + ([] if gate is None else [gate.to(k.dtype)])
    x = torch.cat(parts, -1)
    before = halo(x, W - 1)  # [n, B, W - 1, C]
    n = before.shape[0]
    L = T // n
    nb = -(-L // W)
    rows = _pairs(torch.cat([before.to(x.dtype), x.view(B, n, L, -1).transpose(0, 1)], dim=2), W, nb)
    kp, vp, fkp, *gp = rows.split([G * D, G * D, G * F] + ([] if gate is None else [H]), dim=-1)
    kp, vp, fkp = kp.unflatten(-1, (G, D)), vp.unflatten(-1, (G, D)), fkp.unflatten(-1, (G, F))  # [n,B,nb,2W,G,.]

    def blocks(t: Tensor) -> Tensor:  # [B, T, ...] -> [n, B, nb, W, ...], zero-padded queries
        t = t.view(B, n, L, *t.shape[2:]).transpose(0, 1)
        t = torch.cat([t, t.new_zeros(n, B, nb * W - L, *t.shape[3:])], dim=2)
        return t.unflatten(2, (nb, W))

    qb, fqb = blocks(q).unflatten(-2, (G, r)), blocks(fq).unflatten(-2, (G, r))  # [n, B, nb, W, G, r, .]
    pos = blocks(positions)  # [n, B, nb, W], padding at position 0 (masked out below)
    j = torch.arange(W, device=q.device)[:, None]
    u = torch.arange(2 * W, device=q.device)[None, :]
    dist = j + W - 1 - u  # [W, 2W]: how far key u is behind query j
    valid = (dist >= 0) & (dist < W) & (dist <= pos[..., None])  # [n, B, nb, W, 2W]
    valid = valid[..., None, None, :, :]  # [n, B, nb, 1, 1, W, 2W]
    s = torch.einsum("zbcjgrd,zbcugd->zbcgrju", qb, kp) * D**-0.5
    lin = torch.einsum("zbcjgrf,zbcugf->zbcgrju", fqb, fkp)
    if log_decay is not None:
        decay = torch.exp(dist.clamp(min=0).to(log_decay.dtype) * log_decay[:, None, None])  # [H, W, 2W]
        lin = lin * decay.to(lin.dtype).view(G, r, W, 2 * W)
    if gate is not None:  # the gates of the tokens after key u, up to query j: differences of a running sum
        c = gp[0].cumsum(3)  # [n, B, nb, 2W, H]
        cq = c[:, :, :, W - 1 :][:, :, :, :W]  # the queries' rows (query j sits at row j + W - 1)
        after = (cq[:, :, :, :, None] - c[:, :, :, None]).permute(0, 1, 2, 5, 3, 4)  # [n, B, nb, H, W, 2W]
        lin = lin * torch.exp(torch.minimum(after, after.new_zeros(()))).unflatten(3, (G, r))
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1)  # finite: every query, a padded one too, sees its own row (distance 0)
    w = share.to(s.dtype).view(G, r, 1)
    e = torch.exp(s - m[..., None]) * w[..., None]
    lin = lin * valid
    num = torch.einsum("zbcgrju,zbcugd->zbcgrjd", e, vp)
    num_lin = torch.einsum("zbcgrju,zbcugd->zbcgrjd", lin, vp)
    full = blocks(linear).unflatten(-2, (G, r)).movedim(3, 5)  # [n, B, nb, G, r, W, D + 1]
    z = e.sum(-1) + (1 - w) * (full[..., D] - lin.sum(-1))  # >= w: the query's own score is exp(0)
    out = (num + (1 - w)[..., None] * (full[..., :D] - num_lin)) / z[..., None]
    # [n, B, nb, G, r, W, D] -> [B, T, H, D]
    out = out.movedim(5, 3).flatten(2, 3)[:, :, :L].flatten(3, 4)
    return out.transpose(0, 1).reshape(B, T, H, D)
