"""Autograd-aware collectives over an explicit group: each forward has the collective its gradient needs.

all_gather_stack:  x -> [W, *x.shape] (all ranks' x);  backward: reduce-scatter of the gradient.
                   With a fingerprint, the gather carries the rank agreement header (agree.py).
all_to_all_stack:  x [W, ...] -> [W, ...], piece j goes to rank j;  backward: the same all-to-all.
ring_shift:        x -> the x of rank r-1 (sent to r+1);  backward: the gradient goes the other way.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from lasp.distributed.agree import Fingerprint, start_checked_gather
from lasp.distributed.comm import (
    all_gather_single,
    global_rank,
    group_rank,
    group_size,
    note_collective,
    note_p2p,
    reduce_scatter_single,
)


class _AllGatherStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, fp):
        ctx.group = group
        if fp is not None:
            return start_checked_gather(x, group, fp)[0].wait()
        x = x.contiguous().unsqueeze(0)
        out = x.new_empty(group_size(group), *x.shape[1:])
        note_collective(f"all-gather of {tuple(x.shape[1:])} over {group_size(group)} ranks")
        all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(1, *grad.shape[1:])
        note_collective(f"reduce-scatter of {tuple(grad.shape)} (the backward of an all-gather)")
        reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out.squeeze(0), None, None


class _AllToAllStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        note_collective(f"all-to-all of {tuple(x.shape)} over {group_size(group)} ranks")
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        note_collective(f"all-to-all of {tuple(grad.shape)} (backward) over {group_size(ctx.group)} ranks")
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def _shift(x: Tensor, group, offset: int) -> Tensor:
    """Send x to group rank r+offset and return what rank r-offset sent (both at once, no deadlock)."""
    W, r = group_size(group), group_rank(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    note_collective(f"ring shift of {tuple(x.shape)} by {offset} over {W} ranks")
    note_p2p(out.numel() * out.element_size())
    ops = [
        dist.P2POp(dist.isend, x, global_rank(group, (r + offset) % W), group),
        dist.P2POp(dist.irecv, out, global_rank(group, (r - offset) % W), group),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return out


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shift(x, group, 1)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.group, -1), None


def all_gather_stack(x: Tensor, group=None, fingerprint: Fingerprint | None = None) -> Tensor:
    """Every rank's x stacked in rank order: [W, *x.shape]. Gradient: reduce-scatter. With a
    `fingerprint`, every rank raises RanksDisagree unless all ranks' fingerprints agree."""
    return _AllGatherStack.apply(x, group, fingerprint)


def all_to_all_stack(x: Tensor, group=None) -> Tensor:
    """x [W, ...]: piece j goes to rank j; returns [W, ...] whose piece j came from rank j."""
    if x.shape[0] != group_size(group):
        raise ValueError(
            f"all_to_all_stack needs a leading dim of {group_size(group)} (the group size), got {tuple(x.shape)}"
        )
    return _AllToAllStack.apply(x, group)


def ring_shift(x: Tensor, group=None) -> Tensor:
    """Pass x one rank forward around the ring: returns rank r-1's x. Gradient flows back."""
    return _RingShift.apply(x, group)
