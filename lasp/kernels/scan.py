"""Decayed exclusive scans over a sequence of [B, H, K, V] states.

Used inside the chunked kernel (scan over blocks) and by the SP algorithms (scan over the gathered chunk
states of all ranks). The recurrence is the same at both levels: h_n = D * h_{n-1} + x_{n-1}.
"""

import torch
from torch import Tensor


def exclusive_scan(
    x: Tensor, decay_H: Tensor | None, dim: int, reverse: bool = False, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Decayed exclusive prefix (or suffix, `reverse=True`) sums of x along `dim`, and the carry out.

    Slices of x along `dim` are [B, H, K, V]; decay_H is [H] (None means 1); `initial` is the carry in
    (zero when None). Forward: out_0 = h, out_n = D * out_{n-1} + x_{n-1}, and the carry out is
    D * out_{N-1} + x_{N-1}. Reverse runs the same recurrence from the last index down. This is
    `affine_scan` with the same transition at every step.
    """
    xs = x.movedim(dim, 0)
    d = None if decay_H is None else decay_H.view(1, -1, 1, 1).expand(xs.shape[0], -1, 1, 1)
    out, h = affine_scan(xs, d, reverse=reverse, initial=initial)
    return out.movedim(0, dim), h


def affine_scan(
    x: Tensor, decay: Tensor | None, reverse: bool = False, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exclusive scan along dim 0 with a transition per step: out_0 = h, out_{i+1} = decay_i * out_i + x_i
    (or from the last index down, `reverse=True`: the transposed recurrence of the backward, the same for
    the diagonal transitions used here), and the carry out. x [n, B, H, K, V]; decay [n, ...] broadcasting
    against x's rows (a scalar [n, B, H, 1, 1] or a diagonal [n, B, H, K, 1]), or None (1); `initial` the
    carry in."""
    out = torch.empty_like(x)
    d = None if decay is None else decay.to(x.dtype)
    h = torch.zeros_like(x[0]) if initial is None else initial.to(x.dtype)
    for i in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
        out[i] = h
        h = x[i] + (h if d is None else d[i] * h)
    return out, h


