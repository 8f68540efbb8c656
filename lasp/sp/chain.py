"""The state passed rank to rank: LASP-1 (`lasp1`), and the chain pipelined over column blocks (`allscan`).

Legend: B batch, H heads, K key dim, V value dim, W ranks, n chunks per rank, C = W*n global chunks.

The combiner of lasp.sp.core that chains: each rank waits for the state entering its chunk from the
owner of the previous chunk, applies its own map (S_out = A S_in + M: the transition never leaves its
rank, the delta rule's K x K included) and sends S_out on. Backward: the same chain from the last chunk
down with A^T. Contiguous: W-1 hops each way; zigzag (chunks r and 2W-1-r): the chain goes out and back,
2(W-1) hops.

`allscan` cuts the state into `blocks` groups of V columns. Columns evolve independently under every form
(A acts from the left), so rank r+1 works on block j while rank r sends block j+1 (ZeCO's All-Scan, here
for every transition kind): the chain's latency becomes about (hops + blocks - 1) block times instead of
hops whole-state times. Bytes each rank sends per chunk and direction: K*V, whatever W.
"""

import torch
from torch import Tensor

from lasp.distributed import group_rank
from lasp.distributed.comm import isend, recv
from lasp.kernels.scan import apply, apply_t
from lasp.sp.core import Later
from lasp.sp.layout import SeqLayout

ALLSCAN_BLOCKS = 4
"""V-column blocks the `allscan` chain is pipelined over (fewer when V is smaller)."""


def column_blocks(V: int, blocks: int) -> list[tuple[int, int]]:
    """[start, stop) of `blocks` near-equal groups of V columns (at most V of them)."""
    b = max(1, min(blocks, V))
    edges = [round(i * V / b) for i in range(b + 1)]
    return list(zip(edges, edges[1:]))


class Chain:
    """The chain (module doc): `blocks` = 1 is LASP-1, more is `allscan`."""

    in_band = False

    def __init__(self, group, lay: SeqLayout, blocks: int = 1, name: str = "lasp1"):
        self.group, self.lay, self.blocks, self.name = group, lay, blocks, name

    def _chain(self, A: Tensor | None, x: Tensor, reverse: bool) -> Tensor:
        lay, group, rank, C = self.lay, self.group, group_rank(self.group), self.lay.num_chunks
        mine, step, go = lay.chunks_of(rank), -1 if reverse else 1, apply_t if reverse else apply
        cols = column_blocks(x.shape[-1], self.blocks)
        out, carry, sends = torch.empty_like(x), torch.empty_like(x[0]), []
        for i in sorted(range(len(mine)), key=lambda i: mine[i], reverse=reverse):
            c = mine[i]
            prev, nxt = c - step, c + step
            Ai = None if A is None else A[i]
            for j, (a, b) in enumerate(cols):
                if not 0 <= prev < C:
                    incoming = torch.zeros_like(x[i, ..., a:b])
                elif lay.owner(prev) == rank:
                    incoming = carry[..., a:b].clone()
                else:
                    incoming = recv(x[i, ..., a:b], lay.owner(prev), group, tag=c * len(cols) + j)
                out[i, ..., a:b] = incoming
                carry[..., a:b] = x[i, ..., a:b] + go(Ai, incoming)
                if 0 <= nxt < C and lay.owner(nxt) != rank:
                    sends.append(isend(carry[..., a:b].clone(), lay.owner(nxt), group, tag=nxt * len(cols) + j))
        for work in sends:
            work.wait()
        return out

    def scan(self, A, x, uniform, reverse):
        return Later(lambda: self._chain(A, x, reverse))

    def total(self, x):
        return Later(lambda: self._chain(None, x, False) + x + self._chain(None, x, True))
