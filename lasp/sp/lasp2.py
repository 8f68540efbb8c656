"""LASP-2: sequence-parallel linear attention with one all-gather of fixed-size states per direction.

Legend: B batch, T local tokens, H heads, K key dim, V value dim, W ranks, n chunks per rank,
C = W*n global chunks, L tokens per chunk.

Forward (DESIGN.md section 1): each rank computes the states M of its chunks and starts ONE all-gather;
while it is in flight it computes the intra-chunk output; then it scans the gathered states in GLOBAL
chunk order (so any layout is right) and adds the inter-chunk term. Backward mirrors it with the state
gradients G and a suffix scan. Every rank joins both collectives, even one whose output does not depend
on the gathered states (rank 0, causal, contiguous): the autograd Function always runs its backward.
"""

import torch
from torch import Tensor
from torch.profiler import record_function

from lasp.distributed import all_gather_async, group_rank
from lasp.distributed.agree import Fingerprint, start_checked_gather
from lasp.kernels import LinearAttnKernel
from lasp.kernels.scan import affine_scan, exclusive_scan, matrix_affine_scan
from lasp.sp.dispatch import run_sp_linear_attn
from lasp.sp.gated import GatedChunks, pack_pairs, unpack_pairs
from lasp.sp.layout import SeqLayout, merge_local_chunks, split_local_chunks, take_chunks


def _in_global_order(gathered_WnBHKV: Tensor, lay: SeqLayout) -> Tensor:
    """[W, n, B, H, K, V] (every rank's chunks, rank-major) -> [C, B, H, K, V] in global chunk order."""
    n, index = lay.chunks_per_rank, lay.gather_index()
    if index == list(range(len(index))):
        return gathered_WnBHKV.flatten(0, 1)
    return torch.stack([gathered_WnBHKV[p // n, p % n] for p in index])


def _mine(states_CBHKV: Tensor, lay: SeqLayout, rank: int) -> Tensor:
    """This rank's chunks' rows of a global-order tensor, flattened chunk-major: [n*B, H, K, V]."""
    return take_chunks(states_CBHKV, lay.chunks_of(rank)).flatten(0, 1)


def _total(states_CBHKV: Tensor, n: int) -> Tensor:
    """The bidirectional state (sum over all chunks), repeated for each local chunk: [n*B, H, K, V]."""
    return states_CBHKV.sum(0).repeat(n, 1, 1, 1)


class _Gather:
    """The all-gather of every rank's [n, B, H, K, V] states (or state gradients): plain, or with the rank
    agreement header inside the same message (lasp.distributed.agree) when the call has a fingerprint."""

    def __init__(self, x_nBHKV: Tensor, group, fp: Fingerprint | None, call: int | None = None):
        self.call, self._n = None, x_nBHKV.shape[0]
        if fp is None:
            self._out, self._pending = all_gather_async(x_nBHKV, group)
        else:
            self._pending, self.call = start_checked_gather(x_nBHKV, group, fp, call=call)

    def wait(self) -> Tensor:
        """[W, n, B, H, K, V]: every rank's chunks in rank order."""
        if self.call is None:
            self._pending.wait()
            return self._out.unflatten(0, (-1, self._n))
        return self._pending.wait()


class _Lasp2Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, causal, group, lay: SeqLayout, kernel: LinearAttnKernel, fp):
        n, rank = lay.chunks_per_rank, group_rank(group)
        qc, kc, vc = (split_local_chunks(x, n) for x in (q, k, v))
        m = kernel.chunk_state(kc, vc, log_decay)
        gather = _Gather(m.view(n, -1, *m.shape[1:]), group, fp)
        with record_function("lasp2.overlapped"):  # a label for the cost model (lasp.bench.sp)
            o = kernel.intra_fwd(qc, kc, vc, log_decay, scale) if causal else None
        states = _in_global_order(gather.wait(), lay)
        if causal:
            decay = kernel.chunk_decay(log_decay, qc.shape[1])
            s_in = _mine(exclusive_scan(states, decay, dim=0)[0], lay, rank)
            o = o + kernel.inter_fwd(qc, s_in, log_decay, scale)
        else:
            s_in = _total(states, n)
            o = kernel.inter_fwd(qc, s_in, None, scale)
        ctx.save_for_backward(qc, kc, vc, log_decay, s_in)
        ctx.scale, ctx.causal, ctx.group, ctx.lay, ctx.kernel = scale, causal, group, lay, kernel
        ctx.bwd_fp = None if fp is None else Fingerprint(fp.op + ".bwd")
        ctx.call = gather.call
        return merge_local_chunks(o, n)

    @staticmethod
    def backward(ctx, do):
        qc, kc, vc, log_decay, s_in = ctx.saved_tensors
        kernel, lay, scale, n = ctx.kernel, ctx.lay, ctx.scale, ctx.lay.chunks_per_rank
        g = log_decay if ctx.causal else None
        doc = split_local_chunks(do, n)
        dq, ds = kernel.inter_bwd(qc, s_in, g, scale, doc)
        gather = _Gather(ds.view(n, -1, *ds.shape[1:]), ctx.group, ctx.bwd_fp, ctx.call)
        if ctx.causal:
            with record_function("lasp2.overlapped"):
                dq_i, dk, dv = kernel.intra_bwd(qc, kc, vc, g, scale, doc)
            dq = dq + dq_i
        grads = _in_global_order(gather.wait(), lay)
        if ctx.causal:
            decay = kernel.chunk_decay(g, qc.shape[1])
            dm = _mine(exclusive_scan(grads, decay, dim=0, reverse=True)[0], lay, group_rank(ctx.group))
            dk_s, dv_s = kernel.chunk_state_bwd(kc, vc, g, dm)
            dk, dv = dk + dk_s, dv + dv_s
        else:
            dk, dv = kernel.chunk_state_bwd(kc, vc, None, _total(grads, n))
        return (*(merge_local_chunks(x, n) for x in (dq, dk, dv)), None, None, None, None, None, None, None)


def _keep(ctx, scale: float, group, lay: SeqLayout, kernel, fp: Fingerprint | None, gather: _Gather) -> None:
    """What the backward of a pair-gathering LASP-2 needs besides its tensors: the call's settings, and the
    rank check of its all-gather (the same call number, the op named .bwd)."""
    ctx.scale, ctx.group, ctx.lay, ctx.kernel = scale, group, lay, kernel
    ctx.bwd_fp = None if fp is None else Fingerprint(fp.op + ".bwd")
    ctx.call = gather.call


class _Lasp2GatedFn(torch.autograd.Function):
    """LASP-2 under a data-dependent gate: ONE all-gather of the chunks' affine maps (D_c, M_c) forward, a
    scan with (D2, M2) o (D1, M1) = (D2 D1, D2 M1 + M2) in global chunk order; ONE all-gather of the state
    gradients N_c backward and the reverse scan dS_in = N + D dS_out (sp/gated.py)."""

    @staticmethod
    def forward(ctx, q, k, v, gate, scale, group, lay: SeqLayout, kernel, fp):
        n, rank = lay.chunks_per_rank, group_rank(group)
        ch = GatedChunks(kernel, *(split_local_chunks(x, n) for x in (q, k, v, gate)), scale)
        D, M = ch.pairs()
        pairs = pack_pairs(D, M)
        gather = _Gather(pairs.view(n, -1, *pairs.shape[1:]), group, fp)
        with record_function("lasp2.overlapped"):
            o = ch.intra()
        D_all, M_all = unpack_pairs(_in_global_order(gather.wait(), lay), *M.shape[-2:])
        s_in = _mine(affine_scan(M_all, D_all)[0], lay, rank)
        o = o + ch.inter(s_in)
        ctx.save_for_backward(ch.q, ch.k, ch.v, ch.gate, s_in, D[..., None] * s_in + M, D_all)
        _keep(ctx, scale, group, lay, kernel, fp, gather)
        return merge_local_chunks(o, n)

    @staticmethod
    def backward(ctx, do):
        qc, kc, vc, gc, s_in, s_out, D_all = ctx.saved_tensors
        lay, n = ctx.lay, ctx.lay.chunks_per_rank
        ch = GatedChunks(ctx.kernel, qc, kc, vc, gc, ctx.scale)
        doc = split_local_chunks(do, n)
        dq_s, N = ch.inter_bwd(s_in, doc)
        gather = _Gather(N.view(n, -1, *N.shape[1:]), ctx.group, ctx.bwd_fp, ctx.call)
        with record_function("lasp2.overlapped"):
            intra = ch.intra_bwd(doc)
        N_all = _in_global_order(gather.wait(), lay)
        ds_out = _mine(affine_scan(N_all, D_all, reverse=True)[0], lay, group_rank(ctx.group))
        grads = ch.finish_bwd(intra, dq_s, ds_out, s_out)
        return (*(merge_local_chunks(x, n) for x in grads), None, None, None, None, None)


class _Lasp2DeltaFn(torch.autograd.Function):
    """LASP-2 under the delta rule: each chunk is an affine map of its incoming state, S_out = A S_in + M with
    a K x K transition A, and its output is affine in S_in too, o = o0 + Qm S_in (the kernel's
    delta_transitions, then delta_outputs while the pairs are in flight). ONE all-gather of the pairs
    (A, M) forward and a matrix scan in global chunk order; ONE all-gather of
    N = Qm^T do backward and the reverse scan dS_in = N + A^T dS_out; then the kernel's local backward
    from S_in with dS_out. The pairs and the scan stay in the state dtype (fp32 for bf16 inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, gate, scale, group, lay: SeqLayout, kernel, fp):
        n, rank = lay.chunks_per_rank, group_rank(group)
        qc, kc, vc, bc = (split_local_chunks(x, n) for x in (q, k, v, beta))
        gc = None if gate is None else split_local_chunks(gate, n)
        K = q.shape[-1]
        A, M, rest = kernel.delta_transitions(qc, kc, vc, bc[..., 0], gc, scale)
        pairs = torch.cat([A, M], dim=-1)
        gather = _Gather(pairs.view(n, -1, *pairs.shape[1:]), group, fp)
        with record_function("lasp2.overlapped"):  # the output's zero-start pieces, while the pairs travel
            o0, Qm = kernel.delta_outputs(rest)
        everything = _in_global_order(gather.wait(), lay)
        A_all, M_all = everything[..., :K], everything[..., K:]
        s_in = _mine(matrix_affine_scan(M_all, A_all)[0], lay, rank)
        o = (o0 + torch.einsum("bthk,bhkv->bthv", Qm, s_in)).to(q.dtype)
        ctx.save_for_backward(qc, kc, vc, bc, gc, s_in, Qm, A_all)
        _keep(ctx, scale, group, lay, kernel, fp, gather)
        return merge_local_chunks(o, n)

    @staticmethod
    def backward(ctx, do):
        qc, kc, vc, bc, gc, s_in, Qm, A_all = ctx.saved_tensors
        lay, n = ctx.lay, ctx.lay.chunks_per_rank
        doc = split_local_chunks(do, n)
        N = torch.einsum("bthk,bthv->bhkv", Qm, doc.to(Qm.dtype))
        gather = _Gather(N.view(n, -1, *N.shape[1:]), ctx.group, ctx.bwd_fp, ctx.call)
        N_all = _in_global_order(gather.wait(), lay)
        ds_out = _mine(matrix_affine_scan(N_all, A_all, reverse=True)[0], lay, group_rank(ctx.group))
        dq, dk, dv, db, dg, _ = ctx.kernel.delta_bwd(qc, kc, vc, bc[..., 0], gc, ctx.scale, s_in, doc, ds_out, False)
        grads = [dq, dk, dv, db[..., None], dg]
        return (*(None if x is None else merge_local_chunks(x, n) for x in grads), None, None, None, None, None)


def lasp2_linear_attn(
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
    """LASP-2 linear attention over the sequence-parallel `group` (None = the default group).

    Each rank passes its local shard (see `shard_sequence`): q, k [B, T, H, K] (k, v may have fewer
    heads, GQA), v [B, T, Hkv, V], split by `layout` (`contiguous` or `zigzag`). Returns this rank's
    shard of `linear_attn` on the whole sequence; the gradients of q, k, v are the shards of the full
    gradients. One all-gather of B*H*K*V-sized states per local chunk forward, one backward, whatever T.
    With no process group initialised, or a group of one rank, this is `linear_attn`.

    `gate`: this rank's shard of data-dependent log-gates, [B, T, H] or [B, T, H, K], as in `linear_attn`
    (split like q). The all-gather then carries each chunk's pair (D, M): B*H*(K*V + 1) or B*H*(K*V + K)
    floats per chunk; still one all-gather each way, and the gate gets its gradient on every rank.

    `beta` (this rank's shard [B, T, H], split like q) selects the delta rule, as in `linear_attn`: no gate
    (DeltaNet), a gate [B, T, H] (Gated DeltaNet) or [B, T, H, K] (KDA). Each chunk's pair is then (A, M)
    with a K x K transition: B*H*(K*K + K*V) floats per chunk forward, B*H*K*V backward, one all-gather
    each way; beta and the gate get their gradients on every rank.

    `cu_seqlens`: packed documents over the GLOBAL sequence (every rank passes the same; see
    lasp.kernels.documents). The state resets at each start: a chunk holding a start has D = 0 and its M
    holds only the tokens from its last start, so the all-gather is unchanged (the forms without a gate
    run as a scalar gate: one more float per head and chunk).

    `check_ranks`: the all-gathers also carry a fingerprint of every rank's arguments (local length,
    shapes, dtype, layout, causal, scale, decay), and ranks that disagree all raise `RanksDisagree`
    naming the values (no extra collective; see lasp.distributed.agree). False skips it.
    """
    return run_sp_linear_attn(
        _Lasp2Fn.apply, q, k, v, op="lasp2", group=group, layout=layout, log_decay=log_decay, causal=causal, scale=scale,
        kernel=kernel, check_ranks=check_ranks, in_band=True, gate=gate,
        cu_seqlens=cu_seqlens, gated_impl=_Lasp2GatedFn.apply, beta=beta, delta_impl=_Lasp2DeltaFn.apply,
    )
