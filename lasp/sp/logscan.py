"""`logscan`: the chunks' maps combined by a Hillis-Steele scan in ceil(log2 C) rounds of point-to-point
messages; no rank ever holds more than three pairs, whatever W.

Legend: B batch, H heads, K key dim, V value dim, W ranks, n chunks per rank, C = W*n global chunks.

Round d = 1, 2, 4, ...: the chunk at scan position p sends its inclusive pair (covering positions p-d+1..p)
to position p+d and receives the one of position p-d, which it composes into both its inclusive pair and
its exclusive one ((A2, M2) o (A1, M1) = (A2 A1, A2 M1 + M2), lasp.kernels.scan). After k
rounds the exclusive pair covers the 2^k - 1 positions before p, so ceil(log2 C) rounds give every chunk
its whole prefix (MaxText's Gated DeltaNet context parallelism replaced an all-gather by such a scan).
Backward: the same on reversed positions with A^T. Each message is one pair, B*H*(K*V + the transition's
floats), or only M when the transition is the same everywhere (constant decay: its powers are known).
"""

import math

import torch
from torch import Tensor

from lasp.distributed import group_rank
from lasp.distributed.comm import exchange
from lasp.kernels.scan import apply, compose, normal_products, transpose
from lasp.sp.core import Later
from lasp.sp.layout import SeqLayout


def rounds(num_chunks: int) -> int:
    """Rounds of messages the scan of `num_chunks` positions takes."""
    return math.ceil(math.log2(num_chunks)) if num_chunks > 1 else 0


class LogScan:
    """The log-depth scan (module doc)."""

    name = "logscan"
    in_band = False

    def __init__(self, group, lay: SeqLayout):
        self.group, self.lay = group, lay

    def _scan(self, A: Tensor | None, x: Tensor, uniform: bool, reverse: bool) -> Tensor:
        lay, rank, C = self.lay, group_rank(self.group), self.lay.num_chunks
        chunk = (lambda p: C - 1 - p) if reverse else (lambda p: p)  # scan position -> global chunk (an involution)
        pos = [chunk(c) for c in lay.chunks_of(rank)]
        here = {p: i for i, p in enumerate(pos)}
        A = None if A is None else normal_products(A.clone())
        A = transpose(A) if reverse else A
        travels = A is not None and not uniform
        incl = [(None if A is None else A[i], x[i]) for i in range(len(pos))]
        excl = [(None, torch.zeros_like(x[i])) for i in range(len(pos))]

        def pack(pair):
            return torch.cat([pair[0].flatten(-2).to(x.dtype), pair[1].flatten(-2)], -1) if travels else pair[1]

        def unpack(buf, span):  # copies: a view kept in a pair would keep the whole message alive
            if not travels:
                return (None if A is None else A[0] ** span), buf
            a, b = A.shape[-2:]
            return buf[..., : a * b].unflatten(-1, (a, b)).clone(), buf[..., a * b :].unflatten(
                -1, x.shape[-2:]
            ).clone()

        def one_round(d: int) -> None:  # its messages and received pairs are freed when it returns
            sends = [
                (pack(incl[i]), lay.owner(chunk(p + d)), p + d)
                for i, p in enumerate(pos)
                if p + d < C and lay.owner(chunk(p + d)) != rank
            ]
            takers = [i for i, p in enumerate(pos) if p - d >= 0]
            remote = [i for i in takers if pos[i] - d not in here]
            size = x[0].shape if not travels else (*x.shape[1:-2], A.shape[-2] * A.shape[-1] + x[0, 0, 0].numel())
            received = exchange(
                sends, [(x.new_empty(size), lay.owner(chunk(pos[i] - d)), pos[i]) for i in remote], self.group
            )
            del sends
            earlier = {i: incl[here[pos[i] - d]] for i in takers if i not in remote}
            for i in remote:  # each message is freed once unpacked
                earlier[i] = unpack(received.pop(0), min(d, pos[i] - d + 1))
            last = 2 * d >= C  # the last round needs only the exclusive state: no product of transitions
            for i in takers:
                A_e, M_e = excl[i]
                excl[i] = (None, apply(A_e, earlier[i][1]) + M_e) if last else compose(excl[i], earlier[i])
                if not last:
                    incl[i] = compose(incl[i], earlier[i])

        d = 1
        while d < C:
            one_round(d)
            d *= 2
        return torch.stack([m for _, m in excl])

    def scan(self, A, x, uniform, reverse):
        return Later(lambda: self._scan(A, x, uniform, reverse))

    def total(self, x):
        return Later(lambda: self._scan(None, x, False, False) + x + self._scan(None, x, False, True))
