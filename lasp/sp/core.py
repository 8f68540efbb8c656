"""The one sequence-parallel core of linear attention: every form, every way of combining the states.

Legend: W ranks, n chunks per rank (1 contiguous, 2 zigzag), C = W*n global chunks, B batch, H heads,
K key dim, V value dim.

Each rank's chunks are affine maps of their incoming states, S_out = A_c S_in + M_c (lasp.kernels.
linear_attn.affine: the form decides only A_c's kind). What crosses ranks is the same for every form: the
forward needs each chunk's exclusive prefix of the maps in global chunk order applied to the initial
state (its S_in), the backward the exclusive suffix of the state gradients N_c under the transposed
transitions (its dS_out). A `Combiner` computes exactly that, and nothing else differs between the SP
methods (docs/lasp2.md):

    lasp2    one all-gather of every chunk's pair each way, then the scan on every rank (lasp2.py);
    lasp1    the state passed rank to rank in global chunk order (chain.py);
    allscan  the same chain pipelined over blocks of the state's V columns (chain.py);
    logscan  a Hillis-Steele scan of the pairs in ceil(log2 C) rounds of point-to-point messages (logscan.py).

The bidirectional form (no decay) needs the total of every chunk's M instead: `Combiner.total`.

The initial state is folded into chunk 0's M on its owner (so the combiners scan from zero), and the final
state's gradient into the last chunk's N; the final state comes from the last chunk's owner by one
broadcast. The initial state's gradient is partial per rank (the owner of chunk 0 holds it causally):
sum it over the group, as for any input every rank passes alike.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from lasp.distributed import group_rank
from lasp.distributed.comm import global_rank, note_collective
from lasp.kernels.linear_attn.affine import ChunkMaps, chunk_maps
from lasp.kernels.scan import apply, apply_t
from lasp.sp.layout import SeqLayout, merge_local_chunks, split_local_chunks


class Pending(Protocol):
    def wait(self) -> Tensor:
        """[n, B, H, K, V]: this rank's chunks' entries, in local order."""
        ...


class Later:
    """A combiner's work that runs when its result is asked for (the chains, the log scan), so that the
    zero-start output is computed first."""

    def __init__(self, fn):
        self._fn = fn

    def wait(self) -> Tensor:
        return self._fn()


class Combiner(Protocol):
    """One way of combining the chunks' maps across the ranks of a group (see the module doc)."""

    name: str
    in_band: bool
    """Its forward message carries the rank-agreement fingerprint (else it is exchanged first)."""

    def scan(self, A: Tensor | None, x: Tensor, uniform: bool, reverse: bool) -> Pending:
        """Exclusive scan of this rank's chunks' pairs (A [n, B, H, a, b] or None, x [n, B, H, K, V]) in global
        chunk order (from the last chunk down, under A^T, with `reverse`), from a zero state. `uniform`:
        every chunk on every rank has the same A (it need not travel). Called forward, then reverse."""
        ...

    def total(self, x: Tensor) -> Pending:
        """Every chunk's sum over all chunks (the bidirectional form)."""
        ...


@dataclass
class Job:
    """One call's settings (no tensors with gradients)."""

    combiner: Combiner
    lay: SeqLayout
    group: object
    kernel: object
    scale: float
    causal: bool = True
    log_decay: Tensor | None = None
    want_final: bool = False

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def index_of(self, chunk: int) -> int | None:
        """The local index of global chunk `chunk`, or None if another rank holds it."""
        mine = self.lay.chunks_of(self.rank)
        return mine.index(chunk) if chunk in mine else None


def _per_chunk(x: Tensor | None, n: int) -> Tensor | None:
    """[n*B, ...] chunk-major -> [n, B, ...]."""
    return None if x is None else x.view(n, -1, *x.shape[1:])


def _at(A: Tensor | None, i: int) -> Tensor | None:
    return None if A is None else A[i]


def _broadcast(x: Tensor, src: int, group) -> Tensor:
    x = x.contiguous()
    note_collective(f"broadcast of the final state {tuple(x.shape)} from group rank {src}")
    dist.broadcast(x, src=global_rank(group, src), group=group)
    return x


def _all_reduce(x: Tensor, group) -> Tensor:
    """The sum over the group, in a new tensor (x, autograd's gradient, is left alone)."""
    x = x.clone(memory_format=torch.contiguous_format)
    note_collective(f"all-reduce of the final state's gradient {tuple(x.shape)}")
    dist.all_reduce(x, group=group)
    return x


def _start(
    job: Job, A: Tensor | None, x: Tensor, uniform: bool, reverse: bool, end: int | None, extra: Tensor | None
) -> Pending:
    """Start the combiner on x [n, B, H, K, V]: the total (bidirectional), or the scan with `extra` (the
    initial state forward, the final state's gradient backward) folded into this rank's chunk `end` (the
    first chunk, the last) through its transition."""
    if not job.causal:
        return job.combiner.total(x)
    if extra is not None and end is not None:
        x = x.clone()
        x[end] += (apply_t if reverse else apply)(_at(A, end), extra)
    return job.combiner.scan(A, x, uniform, reverse)


def _put_back(job: Job, s: Tensor, end: int | None, extra: Tensor | None) -> Tensor:
    """The combiner's entries with `_start`'s `extra` put back: added to every chunk's total (bidirectional),
    or as the entry of this rank's chunk `end` itself (the scan ran from zero)."""
    if extra is None:
        return s
    if not job.causal:
        return s + extra
    if end is not None:
        s[end] = extra
    return s


class _CoreFn(torch.autograd.Function):
    """SP linear attention of any form through any combiner: forward S_in, backward dS_out (module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, gate, beta, s0, job: Job):
        n, lay = job.lay.chunks_per_rank, job.lay
        split = lambda x: None if x is None else split_local_chunks(x, n)  # noqa: E731
        maps = chunk_maps(
            job.kernel,
            split(q),
            split(k),
            split(v),
            log_decay=job.log_decay,
            gate=split(gate),
            beta=None if beta is None else split(beta[..., None])[..., 0],
            scale=job.scale,
            causal=job.causal,
        )
        A, M = maps.pairs()
        Av, Mv = _per_chunk(A, n), _per_chunk(M, n)
        first, last = job.index_of(0), job.index_of(lay.num_chunks - 1)
        s0s = None if s0 is None else s0.to(M.dtype)
        pending = _start(job, Av, Mv, maps.uniform, False, first, s0s)
        with record_function("sp.overlapped"):  # the zero-start output, while the combiner's messages travel
            maps.zero_start()
        s_in = _put_back(job, pending.wait(), first, s0s)
        o = maps.output(s_in.flatten(0, 1))
        final = None
        if job.want_final:
            if not job.causal:
                final = s_in[0].clone()
            else:
                final = apply(_at(Av, last), s_in[last]) + Mv[last] if last is not None else torch.empty_like(Mv[0])
                final = _broadcast(final, lay.owner(lay.num_chunks - 1), job.group)
        ctx.save_for_backward(*maps.saved(), A)
        ctx.maps, ctx.job, ctx.s0_dtype = maps.bare(), job, None if s0 is None else s0.dtype
        return merge_local_chunks(o, n), final

    @staticmethod
    def backward(ctx, do, dfinal):
        job, n, lay = ctx.job, ctx.job.lay.chunks_per_rank, ctx.job.lay
        *saved, A = ctx.saved_tensors
        maps: ChunkMaps = ctx.maps.restore(saved)
        doc = split_local_chunks(do, n)
        N = maps.state_grad(doc)
        Av, Nv = _per_chunk(A, n), _per_chunk(N, n)
        first, last = job.index_of(0), job.index_of(lay.num_chunks - 1)
        dsum = None
        if job.want_final:
            dsum = _all_reduce(torch.zeros_like(Nv[0]) if dfinal is None else dfinal.to(Nv.dtype), job.group)
        pending = _start(job, Av, Nv, maps.uniform, True, last, dsum)
        with record_function("sp.overlapped"):
            maps.local_bwd(doc)
        ds_out = _put_back(job, pending.wait(), last, dsum)
        dq, dk, dv, dg, db = maps.grads(ds_out.flatten(0, 1), doc)
        ds0 = None
        if ctx.s0_dtype is not None and ctx.needs_input_grad[5]:
            if not job.causal:  # every local chunk read s0; the final state adds it once
                ds0 = Nv.sum(0) if dfinal is None else Nv.sum(0) + dfinal.to(Nv.dtype)
            elif first is not None:
                ds0 = Nv[first] + apply_t(_at(Av, first), ds_out[first])
            else:
                ds0 = torch.zeros_like(Nv[0])
            ds0 = ds0.to(ctx.s0_dtype)
        merge = lambda x: None if x is None else merge_local_chunks(x, n)  # noqa: E731
        return (
            merge(dq),
            merge(dk),
            merge(dv),
            merge(dg),
            None if db is None else merge(db[..., None])[..., 0],
            ds0,
            None,
        )


def sp_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    job: Job,
    *,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The core on checked arguments: k, v repeated to q's heads, the gate in its vector form [B, T, H, Kg]
    (document starts as -inf), beta [B, T, H]. Returns (this rank's output, the final state or None)."""
    return _CoreFn.apply(q, k, v, gate, beta, initial_state, job)
