"""Ring Attention for linear attention: the baseline the LASP papers measure against.

Legend: B batch, T local tokens, H heads, K key dim, V value dim, L chunk length, W ranks, g log-decay.

K and V pass around the ring (W-1 shifts forward; autograd of the shift sends their gradients back the same
way, W-1 more) and every rank adds, for each of its query chunks, the term of every block that is not in
its causal future. With o_t = s sum_{u<=t} lambda^(t-u) (q_t . k_u) v_u, a query chunk c and an earlier key
chunk c' (global chunk ids, so either layout is exact) contribute, in one of two forms:
- quadratic ("quadratic", the LASP-2 paper's Ring baseline): (q k^T * lambda^((c-c')L + a - b)) v, an L x L
  block of scores per pair;
- right-product ("right"): the block's state S = sum_b lambda^(L-1-b) k_b v_b^T, then
  lambda^((c-c'-1)L + a + 1) q_a S: K x V per pair, no L x L scores.
The diagonal block is the causal intra-chunk term in both. Unlike LASP-1 and LASP-2, what travels is the
keys and values (grows with T), not a state (does not).
"""

import torch
from torch import Tensor

from lasp.distributed import group_rank, ring_shift
from lasp.sp.dispatch import LinearForm, run_sp_linear_attn
from lasp.sp.kv import pack_kv, unpack_kv
from lasp.sp.layout import SeqLayout

FORMS = ("right", "quadratic")


def _decay(g: Tensor | None, dist: Tensor) -> Tensor | None:
    """lambda^dist per head: [H, *dist.shape], or None without decay."""
    return None if g is None else torch.exp(g.view(-1, *([1] * dist.dim())) * dist)


def _pair(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    gap: int | None,
    form: str,
    ids: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The term of key chunk k, v for query chunk q ([B, L, H, *]); `gap` = c - c' (0: the diagonal block,
    None: bidirectional, every pair in full). `ids` (query ids [B, L], key ids [B, L]): packed documents,
    only pairs within one document count."""
    L = q.shape[1]
    if ids is not None and gap is not None and gap > 0 and form == "right":
        # a later query meets only the key chunk's last document: its keys, and the queries still in it
        q_ids, k_ids = ids
        last = k_ids[:, -1:]
        k = k * (k_ids == last)[..., None, None].to(k.dtype)
        q = q * (q_ids == last)[..., None, None].to(q.dtype)
    a = torch.arange(L, device=q.device, dtype=q.dtype)
    if gap is None:  # bidirectional: no decay, every pair in full
        if form == "right":
            return torch.einsum("blhk,bhkv->blhv", q, torch.einsum("bmhk,bmhv->bhkv", k, v))
        return torch.einsum("bhlm,bmhv->blhv", torch.einsum("blhk,bmhk->bhlm", q, k), v)
    if gap > 0 and form == "right":
        w_k, w_q = _decay(g, L - 1 - a), _decay(g, (gap - 1) * L + a + 1)  # [H, L] each
        kk = k if w_k is None else k * w_k.T[None, :, :, None]
        qq = q if w_q is None else q * w_q.T[None, :, :, None]
        return torch.einsum("blhk,bhkv->blhv", qq, torch.einsum("bmhk,bmhv->bhkv", kk, v))
    dist = gap * L + a[:, None] - a[None, :]  # [L, L]: query a, key b
    scores = torch.einsum("blhk,bmhk->bhlm", q, k)
    w = _decay(g, dist.clamp(min=0))  # the masked (future) entries get weight 1, not an overflow
    if w is not None:
        scores = scores * w[None]
    if gap == 0:
        scores = scores.masked_fill(dist[None, None] < 0, 0.0)
    if ids is not None:
        scores = scores * (ids[0][:, None, :, None] == ids[1][:, None, None, :]).to(scores.dtype)
    return torch.einsum("bhlm,bmhv->blhv", scores, v)


def _ring_linear(q, k, v, lf: LinearForm, scale, group, lay: SeqLayout, kernel, fp, *, form: str) -> Tensor:
    log_decay, causal, docs = lf.log_decay, lf.causal, lf.docs
    rank, W, n = group_rank(group), lay.world_size, lay.chunks_per_rank
    B, T, H, K = q.shape
    L = T // n
    ids = None if docs is None else docs.ids(q.device)  # [B, N]: every chunk's document ids, no communication
    g = None if log_decay is None else log_decay.to(q.dtype)
    qs = [q[:, i * L : (i + 1) * L] * scale for i in range(n)]
    out: list[Tensor | None] = [None] * n
    block = pack_kv(k, v)
    for step in range(W):
        if step:
            block = ring_shift(block, group)
        kb, vb = unpack_kv(block, H, K)
        for j, cj in enumerate(lay.chunks_of((rank - step) % W)):
            kj, vj = kb[:, j * L : (j + 1) * L], vb[:, j * L : (j + 1) * L]
            for i, ci in enumerate(lay.chunks_of(rank)):
                if causal and cj > ci:
                    continue
                pair_ids = None if ids is None else (ids[:, ci * L : (ci + 1) * L], ids[:, cj * L : (cj + 1) * L])
                part = _pair(qs[i], kj, vj, g, ci - cj if causal else None, form, pair_ids)
                out[i] = part if out[i] is None else out[i] + part
    # Every rank relays the gradients of the blocks it passed on, even one that used none of them (rank 0,
    # causal, contiguous): a zero-weighted use of the last block makes autograd run every backward shift
    # on every rank, in the same order.
    out[0] = out[0] + 0.0 * block.sum()
    return torch.cat(out, dim=1)


def ring_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "contiguous",
    log_decay: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    form: str = "right",
    check_ranks: bool = True,
    cu_seqlens=None,
    beta: Tensor | None = None,
) -> Tensor:
    """Ring Attention for linear attention over `group` (a baseline); same contract as `lasp1_linear_attn`
    (no gate), plus `form`: "right" (per-block states) or "quadratic" (L x L scores per block pair).
    `cu_seqlens`: each block pair keeps only pairs within one document (the global ids, no communication);
    in the right form a later query chunk meets only the key chunk's last document. `beta` (the delta rule)
    is refused: its state is no sum of per-block terms, so there is no right-product form to ring."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    return run_sp_linear_attn(
        lambda *args, **kw: _ring_linear(*args, form=form, **kw),
        q,
        k,
        v,
        op=f"ring-linear-{form[0]}",
        group=group,
        layout=layout,
        log_decay=log_decay,
        causal=causal,
        scale=scale,
        kernel=None,
        check_ranks=check_ranks,
        cu_seqlens=cu_seqlens,
        beta=beta,
        supports=frozenset({"own_documents"}),
        why_not={
            "beta": " (the delta rule's state is no sum of per-block terms: there is no right-product form to ring)"
        },
    )
