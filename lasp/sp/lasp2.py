"""LASP-2: sequence-parallel linear attention with one all-gather of fixed-size pairs per direction.

Legend: B batch, H heads, K key dim, V value dim, W ranks, n chunks per rank, C = W*n global chunks.

The combiner of lasp.sp.core that gathers: forward, each rank starts ONE all-gather of its chunks' pairs
(A_c, M_c) (only M_c when A_c is the same everywhere: constant decay, or none); while it is in flight the
core computes the zero-start output; then every rank scans the gathered pairs in GLOBAL chunk order (so
any layout is right) and keeps its chunks' incoming states. Backward mirrors it: ONE all-gather of the
state gradients N_c and the reverse scan under the transitions gathered forward. Every rank joins both
collectives, even one whose output does not depend on the gathered states (rank 0, causal, contiguous).
Bytes per rank: the pairs of its n chunks, B*H*(K*V + the transition's floats) each, whatever T; the
gathered buffer holds W of them (the cost that `allscan` and `logscan` avoid at large W).
"""

import torch
from torch import Tensor

from lasp.distributed import all_gather_async, group_rank
from lasp.distributed.agree import Fingerprint, start_checked_gather
from lasp.kernels.scan import affine_scan
from lasp.sp.core import Later
from lasp.sp.layout import SeqLayout, take_chunks


def _in_global_order(gathered_Wn: Tensor, lay: SeqLayout) -> Tensor:
    """[W, n, ...] (every rank's chunks, rank-major) -> [C, ...] in global chunk order."""
    n, index = lay.chunks_per_rank, lay.gather_index()
    if index == list(range(len(index))):
        return gathered_Wn.flatten(0, 1)
    return torch.stack([gathered_Wn[p // n, p % n] for p in index])


class _Gather:
    """The all-gather of every rank's [n, B, H, ...] pairs (or state gradients): plain, or with the rank
    agreement header inside the same message (lasp.distributed.agree) when the call has a fingerprint."""

    def __init__(self, x_nBH: Tensor, group, fp: Fingerprint | None, call: int | None = None):
        self.call, self._n = None, x_nBH.shape[0]
        if fp is None:
            self._out, self._pending = all_gather_async(x_nBH, group)
        else:
            self._pending, self.call = start_checked_gather(x_nBH, group, fp, call=call)

    def wait(self) -> Tensor:
        """[W, n, B, H, ...]: every rank's chunks in rank order."""
        if self.call is None:
            self._pending.wait()
            return self._out.unflatten(0, (-1, self._n))
        return self._pending.wait()


class AllGather:
    """LASP-2's combiner (module doc). One object per call: the backward reuses the forward's gathered
    transitions and its rank-check call number."""

    name = "lasp2"
    in_band = True

    def __init__(self, group, lay: SeqLayout, fp: Fingerprint | None):
        self.group, self.lay, self.fp = group, lay, fp
        self.call, self.A_all = None, None

    def _gather(self, x: Tensor, forward: bool) -> _Gather:
        if forward:
            g = _Gather(x, self.group, self.fp)
            self.call = g.call
            return g
        return _Gather(x, self.group, None if self.fp is None else Fingerprint(self.fp.op + ".bwd"), self.call)

    def _mine(self, x_C: Tensor) -> Tensor:
        return take_chunks(x_C, self.lay.chunks_of(group_rank(self.group)))

    def scan(self, A, x, uniform, reverse):
        travels = A is not None and not uniform and not reverse
        buf = torch.cat([A.flatten(-2).to(x.dtype), x.flatten(-2)], dim=-1) if travels else x
        gather = self._gather(buf, not reverse)

        def finish():
            everything = _in_global_order(gather.wait(), self.lay)
            if travels:
                a, b = A.shape[-2:]
                self.A_all = everything[..., : a * b].unflatten(-1, (a, b))
                x_all = everything[..., a * b :].unflatten(-1, x.shape[-2:])
            else:
                x_all = everything
                if not reverse:
                    self.A_all = None if A is None else A[:1].expand(everything.shape[0], *A.shape[1:])
            return self._mine(affine_scan(self.A_all, x_all, reverse=reverse)[0])

        return Later(finish)

    def total(self, x):
        gather = self._gather(x, self.call is None)
        return Later(lambda: gather.wait().sum((0, 1))[None].expand_as(x).clone())
