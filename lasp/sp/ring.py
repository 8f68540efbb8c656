"""Ring Attention: K/V blocks pass point-to-point around the ring, merged with an online softmax.

Legend: B batch, T local tokens, Hq query heads, Hkv key/value heads, L chunk length, W ranks.

Forward: W-1 steps; at step s a rank holds the K/V of rank r-s and attends its query chunks to every
chunk of that block that is not in their causal future (chunk ids from the layout, so zigzag balances the
work). Backward (the flash-attention formula with the saved log-sum-exp): the K/V blocks go around again
together with their dK/dV accumulators, W-1 steps, and one last step brings the accumulators home.
Packed documents: each pair of chunks masks the scores across documents, with the ids of both chunks
sliced from the global document ids (no communication); a query that sees no key of its document in a
block merges an empty partial (lse = -inf).
"""

import torch
from torch import Tensor

from lasp.distributed import group_rank, ring_shift
from lasp.kernels.softmax_attn import attn_block_bwd, attn_with_lse, merge_partials
from lasp.sp.dispatch import run_sp_softmax_attn
from lasp.sp.kv import pack_kv, unpack_kv
from lasp.sp.layout import SeqLayout


def _pairs(lay: SeqLayout, rank: int, src: int, causal: bool, ids, L: int):
    """(local query chunk i, block chunk j, diagonal?, document ids of both or None) pairs rank `rank`
    computes against src's block; `ids` [B, N] the global document ids, or None."""
    for j, kc in enumerate(lay.chunks_of(src)):
        for i, qc in enumerate(lay.chunks_of(rank)):
            if not (causal and kc > qc):
                pair = None if ids is None else (ids[:, qc * L : (qc + 1) * L], ids[:, kc * L : (kc + 1) * L])
                yield i, j, causal and kc == qc, pair


class _RingAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, lay: SeqLayout, docs):
        rank, W, L = group_rank(group), lay.world_size, q.shape[1] // lay.chunks_per_rank
        ids = None if docs is None else docs.ids(q.device)
        Hkv, D = k.shape[2], k.shape[3]
        kv = pack_kv(k, v).contiguous()
        acc = [None] * lay.chunks_per_rank
        block = kv
        for step in range(W):
            if step:
                block = ring_shift(block, group)
            kb, vb = unpack_kv(block, Hkv, D)
            for i, j, diag, pair in _pairs(lay, rank, (rank - step) % W, causal, ids, L):
                part = attn_with_lse(
                    q[:, i * L : (i + 1) * L],
                    kb[:, j * L : (j + 1) * L],
                    vb[:, j * L : (j + 1) * L],
                    causal=diag,
                    scale=scale,
                    doc_ids=pair,
                )
                acc[i] = part if acc[i] is None else merge_partials(*acc[i], *part)
        o = torch.cat([a[0] for a in acc], dim=1)
        lse = torch.cat([a[1] for a in acc], dim=1)
        ctx.save_for_backward(q, kv, o, lse)
        ctx.causal, ctx.scale, ctx.group, ctx.lay, ctx.kv_shape = causal, scale, group, lay, (Hkv, D)
        ctx.ids = ids
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, kv, o, lse = ctx.saved_tensors
        lay, group, (Hkv, D) = ctx.lay, ctx.group, ctx.kv_shape
        rank, W, L = group_rank(group), lay.world_size, q.shape[1] // lay.chunks_per_rank
        do = do.to(o.dtype)
        delta = (do * o).sum(-1)
        dq = torch.zeros(q.shape, dtype=o.dtype, device=q.device)
        width = kv.shape[-1]
        msg = torch.cat([kv.to(o.dtype), torch.zeros_like(kv, dtype=o.dtype)], dim=-1)
        for step in range(W):
            if step:
                msg = ring_shift(msg, group)
            kb, vb = unpack_kv(msg[..., :width], Hkv, D)
            dkb, dvb = unpack_kv(msg[..., width:], Hkv, D)
            for i, j, diag, pair in _pairs(lay, rank, (rank - step) % W, ctx.causal, ctx.ids, L):
                qs, ks = slice(i * L, (i + 1) * L), slice(j * L, (j + 1) * L)
                dq_p, dk_p, dv_p = attn_block_bwd(
                    q[:, qs],
                    kb[:, ks],
                    vb[:, ks],
                    do[:, qs],
                    lse[:, qs],
                    delta[:, qs],
                    causal=diag,
                    scale=ctx.scale,
                    doc_ids=pair,
                )
                dq[:, qs] += dq_p
                dkb[:, ks] += dk_p
                dvb[:, ks] += dv_p
        # the accumulators now belong to rank r+1's block: one more hop takes every block's home
        dkv = ring_shift(msg[..., width:].contiguous(), group) if W > 1 else msg[..., width:]
        dk, dv = unpack_kv(dkv, Hkv, D)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None, None


def ring_softmax_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
    check_ranks: bool = True,
    cu_seqlens=None,
) -> Tensor:
    """Ring Attention over `group`; same contract as `lasp2h_softmax_attn` (`cu_seqlens` included), except
    that `check_ranks` costs one small all-gather of fingerprints per call (its hops carry no header)."""
    return run_sp_softmax_attn(
        lambda q, k, v, lay, group, causal, scale, fp, docs: _RingAttnFn.apply(
            q, k, v, causal, scale, group, lay, docs
        ),
        q,
        k,
        v,
        op="ring",
        group=group,
        layout=layout,
        causal=causal,
        scale=scale,
        check_ranks=check_ranks,
        cu_seqlens=cu_seqlens,
    )
