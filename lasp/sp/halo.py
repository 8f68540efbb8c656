"""The rows a local operator needs from before each of this rank's chunks (a halo), for the short causal
convolution of delta-rule layers and the sliding window of linearised ones (docs/design.md, "The math":
operators that reach back across a chunk boundary).

Legend: B batch, T local tokens, C channels, n chunks per rank, L tokens per chunk, r halo rows.

Under either layout a chunk's predecessor in the sequence lives on another rank (zigzag: even this rank's
second chunk's). Every rank puts the last r rows of each of its chunks into ONE all-gather and takes, for
each of its chunks, the rows of the chunk before it in GLOBAL order (zeros before the first chunk). The
backward is one all-gather of the halos' gradients; each rank adds to its chunks' last rows the gradient
that the owner of the next chunk computed for them. Never an all-gather of the sequence.
"""

import torch
from torch import Tensor

from lasp.distributed import all_gather_async, group_rank, group_size
from lasp.sp.layout import SeqLayout


def _tails(x_BTC: Tensor, n: int, rows: int) -> Tensor:
    """[B, T, C] -> the last `rows` rows of each of its n chunks, [n, B, rows, C]."""
    B, T, C = x_BTC.shape
    return x_BTC.view(B, n, T // n, C)[:, :, -rows:].transpose(0, 1).contiguous()


def _gather(x: Tensor, group) -> Tensor:
    out, pending = all_gather_async(x, group)
    pending.wait()
    return out.unflatten(0, (-1, x.shape[0]))  # [W, n, ...]


class _HaloFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTC, rows: int, group, lay: SeqLayout):
        n, rank = lay.chunks_per_rank, group_rank(group)
        every = _gather(_tails(x_BTC, n, rows), group)  # [W, n, B, rows, C]
        halos = []
        for c in lay.chunks_of(rank):
            prev = c - 1
            halos.append(
                torch.zeros_like(every[0, 0])
                if prev < 0
                else every[lay.owner(prev), lay.chunks_of(lay.owner(prev)).index(prev)]
            )
        ctx.rows, ctx.group, ctx.lay, ctx.shape = rows, group, lay, x_BTC.shape
        return torch.stack(halos)

    @staticmethod
    def backward(ctx, dhalo):
        lay, n, rank = ctx.lay, ctx.lay.chunks_per_rank, group_rank(ctx.group)
        every = _gather(dhalo.contiguous(), ctx.group)  # [W, n, B, rows, C]: each halo's gradient, by its user
        B, T, C = ctx.shape
        dx = dhalo.new_zeros(B, n, T // n, C)
        for i, c in enumerate(lay.chunks_of(rank)):
            nxt = c + 1
            if nxt < lay.num_chunks:
                user = lay.owner(nxt)
                dx[:, i, -ctx.rows :] = every[user, lay.chunks_of(user).index(nxt)]
        return dx.view(B, T, C), None, None, None


def halo_rows(x_BTC: Tensor, rows: int, *, group=None, layout: str = "contiguous") -> Tensor:
    """For each of this rank's chunks of x [B, T, C] (split by `layout` over `group`), the `rows` rows
    before it in the global sequence: [n, B, rows, C], zeros before the sequence's start. With no process
    group or a group of one: zeros (one chunk); no collective for 0 rows. Chunks must hold at least `rows` tokens."""
    W = group_size(group)
    lay = SeqLayout(layout, W)
    n = lay.chunks_per_rank
    B, T, C = x_BTC.shape
    if T % n or T // n < rows:
        raise ValueError(
            f"a halo of {rows} rows needs chunks of at least {rows} tokens: {T} local tokens in {n} "
            f"chunk(s) of the {layout} layout over {W} ranks"
        )
    if W == 1 or rows == 0:
        return x_BTC.new_zeros(1 if W == 1 else n, B, rows, C)
    return _HaloFn.apply(x_BTC, rows, group, lay)
