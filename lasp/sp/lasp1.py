"""LASP-1: the ring baseline. The running state hops point-to-point from chunk to chunk in global order.

Legend: B batch, T local tokens, H heads, K key dim, V value dim, n chunks per rank.

Forward: each rank computes its intra-chunk output first (it does not depend on other ranks), then waits
for the incoming state of each of its chunks from the owner of the previous chunk, adds the inter-chunk
term and sends the outgoing state on. Backward runs the same chain in reverse for the state gradients.
Contiguous: W-1 sequential hops each way; zigzag: 2(W-1). It exists for comparison with LASP-2,
which does the same scan with one all-gather.
"""

import torch
from torch import Tensor

from lasp.distributed import group_rank, recv, send
from lasp.kernels import LinearAttnKernel
from lasp.sp.dispatch import run_sp_linear_attn
from lasp.sp.gated import GatedChunks
from lasp.sp.layout import SeqLayout, merge_local_chunks, split_local_chunks


def _chain_scan(x_nBHKV: Tensor, decay: Tensor | None, lay: SeqLayout, group, reverse: bool,
                matrix: bool = False) -> Tensor:
    """Decayed exclusive prefix (suffix if `reverse`) of every chunk's x in global order, passed hop by
    hop between owners. `decay`: None, a constant per head [H], or one transition per local chunk
    [n, B, H, Kg, 1] (gates), or with `matrix` [n, B, H, K, K] (the delta rule; transposed in reverse).
    Returns this rank's entries [n, B, H, K, V]."""
    rank, num = group_rank(group), lay.num_chunks
    mine = lay.chunks_of(rank)
    step = -1 if reverse else 1
    if decay is None or decay.dim() == 1:
        d = [None if decay is None else decay.to(x_nBHKV.dtype).view(-1, 1, 1)] * len(mine)
    else:
        d = list(decay.to(x_nBHKV.dtype))
    out = torch.empty_like(x_nBHKV)
    carry = None
    for i in sorted(range(len(mine)), key=lambda i: mine[i], reverse=reverse):
        c = mine[i]
        prev, nxt = c - step, c + step
        if not 0 <= prev < num:
            incoming = torch.zeros_like(x_nBHKV[i])
        elif lay.owner(prev) == rank:
            incoming = carry
        else:
            incoming = recv(x_nBHKV[i], lay.owner(prev), group)
        out[i] = incoming
        if matrix:
            carry = x_nBHKV[i] + (d[i].transpose(-1, -2) if reverse else d[i]) @ incoming
        else:
            carry = x_nBHKV[i] + (incoming if d[i] is None else incoming * d[i])
        if 0 <= nxt < num and lay.owner(nxt) != rank:
            send(carry, lay.owner(nxt), group)
    return out


def _chain_total(x_nBHKV: Tensor, lay: SeqLayout, group) -> Tensor:
    """Sum over all chunks for each local chunk: prefix hops, then suffix hops."""
    before = _chain_scan(x_nBHKV, None, lay, group, reverse=False)
    after = _chain_scan(x_nBHKV, None, lay, group, reverse=True)
    return before + x_nBHKV + after


class _Lasp1Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, causal, group, lay: SeqLayout, kernel: LinearAttnKernel, fp):
        n = lay.chunks_per_rank
        qc, kc, vc = (split_local_chunks(x, n) for x in (q, k, v))
        m = kernel.chunk_state(kc, vc, log_decay)
        m = m.view(n, -1, *m.shape[1:])
        if causal:
            o = kernel.intra_fwd(qc, kc, vc, log_decay, scale)
            decay = kernel.chunk_decay(log_decay, qc.shape[1])
            s_in = _chain_scan(m, decay, lay, group, reverse=False).flatten(0, 1)
            o = o + kernel.inter_fwd(qc, s_in, log_decay, scale)
        else:
            s_in = _chain_total(m, lay, group).flatten(0, 1)
            o = kernel.inter_fwd(qc, s_in, None, scale)
        ctx.save_for_backward(qc, kc, vc, log_decay, s_in)
        ctx.scale, ctx.causal, ctx.group, ctx.lay, ctx.kernel = scale, causal, group, lay, kernel
        return merge_local_chunks(o, n)

    @staticmethod
    def backward(ctx, do):
        qc, kc, vc, log_decay, s_in = ctx.saved_tensors
        kernel, lay, scale, n = ctx.kernel, ctx.lay, ctx.scale, ctx.lay.chunks_per_rank
        g = log_decay if ctx.causal else None
        doc = split_local_chunks(do, n)
        dq, ds = kernel.inter_bwd(qc, s_in, g, scale, doc)
        ds = ds.view(n, -1, *ds.shape[1:])
        if ctx.causal:
            dq_i, dk, dv = kernel.intra_bwd(qc, kc, vc, g, scale, doc)
            decay = kernel.chunk_decay(g, qc.shape[1])
            dm = _chain_scan(ds, decay, lay, ctx.group, reverse=True).flatten(0, 1)
            dk_s, dv_s = kernel.chunk_state_bwd(kc, vc, g, dm)
            dq, dk, dv = dq + dq_i, dk + dk_s, dv + dv_s
        else:
            dk, dv = kernel.chunk_state_bwd(kc, vc, None, _chain_total(ds, lay, ctx.group).flatten(0, 1))
        return (*(merge_local_chunks(x, n) for x in (dq, dk, dv)), None, None, None, None, None, None, None)


class _Lasp1GatedFn(torch.autograd.Function):
    """LASP-1 under a data-dependent gate: each hop carries a chunk's outgoing state S_out = D S_in + M."""

    @staticmethod
    def forward(ctx, q, k, v, gate, scale, group, lay: SeqLayout, kernel, fp):
        n = lay.chunks_per_rank
        ch = GatedChunks(kernel, *(split_local_chunks(x, n) for x in (q, k, v, gate)), scale)
        D, M = ch.pairs()
        D = D.view(n, -1, *D.shape[1:], 1)
        o = ch.intra()
        s_in = _chain_scan(M.view(n, -1, *M.shape[1:]), D, lay, group, reverse=False).flatten(0, 1)
        o = o + ch.inter(s_in)
        ctx.save_for_backward(ch.q, ch.k, ch.v, ch.gate, s_in, D.flatten(0, 1) * s_in + M, D)
        ctx.scale, ctx.group, ctx.lay, ctx.kernel = scale, group, lay, kernel
        return merge_local_chunks(o, n)

    @staticmethod
    def backward(ctx, do):
        qc, kc, vc, gc, s_in, s_out, D = ctx.saved_tensors
        n = ctx.lay.chunks_per_rank
        ch = GatedChunks(ctx.kernel, qc, kc, vc, gc, ctx.scale)
        doc = split_local_chunks(do, n)
        dq_s, N = ch.inter_bwd(s_in, doc)
        intra = ch.intra_bwd(doc)
        ds_out = _chain_scan(N.view(n, -1, *N.shape[1:]), D, ctx.lay, ctx.group, reverse=True).flatten(0, 1)
        grads = ch.finish_bwd(intra, dq_s, ds_out, s_out)
        return (*(merge_local_chunks(x, n) for x in grads), None, None, None, None, None)


class _Lasp1DeltaFn(torch.autograd.Function):
    """LASP-1 under the delta rule: each hop carries a chunk's outgoing state S_out = A S_in + M (K x K A)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, gate, scale, group, lay: SeqLayout, kernel, fp):
        n = lay.chunks_per_rank
        qc, kc, vc, bc = (split_local_chunks(x, n) for x in (q, k, v, beta))
        gc = None if gate is None else split_local_chunks(gate, n)
        o0, Qm, A, M = kernel.delta_maps(qc, kc, vc, bc[..., 0], gc, scale)
        A = A.view(n, -1, *A.shape[1:])
        s_in = _chain_scan(M.view(n, -1, *M.shape[1:]), A, lay, group, reverse=False, matrix=True).flatten(0, 1)
        o = (o0 + torch.einsum("bthk,bhkv->bthv", Qm, s_in)).to(q.dtype)
        ctx.save_for_backward(qc, kc, vc, bc, gc, s_in, Qm, A)
        ctx.scale, ctx.group, ctx.lay, ctx.kernel = scale, group, lay, kernel
        return merge_local_chunks(o, n)

    @staticmethod
    def backward(ctx, do):
        qc, kc, vc, bc, gc, s_in, Qm, A = ctx.saved_tensors
        n = ctx.lay.chunks_per_rank
        doc = split_local_chunks(do, n)
        N = torch.einsum("bthk,bthv->bhkv", Qm, doc.to(Qm.dtype))
        ds_out = _chain_scan(N.view(n, -1, *N.shape[1:]), A, ctx.lay, ctx.group, reverse=True,
                             matrix=True).flatten(0, 1)
        dq, dk, dv, db, dg, _ = ctx.kernel.delta_bwd(qc, kc, vc, bc[..., 0], gc, ctx.scale, s_in, doc, ds_out, False)
        grads = [dq, dk, dv, db[..., None], dg]
        return (*(None if x is None else merge_local_chunks(x, n) for x in grads), None, None, None, None, None)


def lasp1_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "contiguous",
    log_decay: Tensor | None = None,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    kernel: LinearAttnKernel | None = None,
    check_ranks: bool = True,
    cu_seqlens=None,
) -> Tensor:
    """LASP-1 (ring, point-to-point) linear attention; same contract as `lasp2_linear_attn`, except that
    `check_ranks` costs one small all-gather of fingerprints per call (its hops carry no header). With a
    `gate` ([B, T, H] or [B, T, H, K], split like q) every hop carries a chunk's gated outgoing state; with
    `beta` (the delta rule) the same, after a K x K transition."""
    return run_sp_linear_attn(
        _Lasp1Fn.apply, q, k, v, op="lasp1", group=group, layout=layout, log_decay=log_decay, causal=causal, scale=scale,
        kernel=kernel, check_ranks=check_ranks, gate=gate, cu_seqlens=cu_seqlens, gated_impl=_Lasp1GatedFn.apply,
        beta=beta, delta_impl=_Lasp1DeltaFn.apply,
    )
