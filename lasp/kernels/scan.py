"""Scans over a sequence of [B, H, K, V] states, and the algebra of a chunk (or block) as an affine map.

Used inside the kernels (scans over blocks) and by the SP core (over the chunks of all ranks): the
recurrence is the same at both levels, S_out = A S_in + M, and only the kind of the transition A differs,
told by its last two dims (docs/lasp2.md, "The affine-map core"):
    None            the identity (no decay, or bidirectional);
    [..., H, 1, 1]  a scalar per head (constant decay, a scalar gate);
    [..., H, K, 1]  a diagonal, one factor per key row (a vector gate);
    [..., H, K, K]  a full matrix (the delta rule).
"""

import torch
from torch import Tensor


def decayed_scan(
    x: Tensor, decay_H: Tensor | None, dim: int, reverse: bool = False, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Decayed exclusive prefix (or suffix, `reverse=True`) sums of x along `dim`, and the carry out: slices of
    x along `dim` are [B, H, K, V]; decay_H is [H] (None means 1); `initial` is the carry in. `affine_scan`
    with the same scalar transition at every step."""
    xs = x.movedim(dim, 0)
    d = None if decay_H is None else decay_H.to(x.dtype).view(1, -1, 1, 1).expand(xs.shape[0], -1, 1, 1)
    out, h = affine_scan(d, xs, reverse=reverse, initial=initial)
    return out.movedim(0, dim), h


def apply(A: Tensor | None, S: Tensor) -> Tensor:
    """A S for a transition of any kind."""
    if A is None:
        return S
    return A * S if A.shape[-1] == 1 else A.to(S.dtype) @ S


def apply_t(A: Tensor | None, S: Tensor) -> Tensor:
    """A^T S: the state gradient's step backwards (scalar and diagonal transitions are symmetric)."""
    if A is None:
        return S
    return A * S if A.shape[-1] == 1 else A.to(S.dtype).transpose(-1, -2) @ S


def transpose(A: Tensor | None) -> Tensor | None:
    """A^T, as a transition of the same kind."""
    return A if A is None or A.shape[-1] == 1 else A.transpose(-1, -2)


def normal_products(A: Tensor) -> Tensor:
    """A with the entries below the square root of the dtype's smallest normal number set to 0 (in place),
    so that no product of two entries is subnormal: a product of many decays underflows, and a CPU
    multiplies subnormals about 100x slower (a Gated DeltaNet logscan at W = 8 spent 0.3 s in one product
    of two K x K transitions). The entries dropped are below any result's precision."""
    return A.masked_fill_(A.abs() < torch.finfo(A.dtype).tiny ** 0.5, 0)


def compose_transitions(A2: Tensor | None, A1: Tensor | None) -> Tensor | None:
    """A2 A1 (A1 first), any kinds: a diagonal times a matrix scales its rows, a matrix times a diagonal its
    columns; the result has the wider kind, its entries kept out of the subnormals (`normal_products`)."""
    if A1 is None or A2 is None:
        return A2 if A1 is None else A1
    if A2.shape[-1] == 1:
        return normal_products(A2 * A1)
    if A1.shape[-1] == 1:
        return normal_products(A2 * A1.transpose(-1, -2))
    return normal_products(A2 @ A1)


def compose(later: tuple[Tensor | None, Tensor], earlier: tuple[Tensor | None, Tensor]) -> tuple[Tensor | None, Tensor]:
    """(A2, M2) o (A1, M1) = (A2 A1, A2 M1 + M2): two consecutive chunks' maps as one. Associative, so any
    grouping of a scan (a chain, a tree) gives the same states."""
    (A2, M2), (A1, M1) = later, earlier
    return compose_transitions(A2, A1), apply(A2, M1) + M2


def affine_scan(
    A: Tensor | None, x: Tensor, reverse: bool = False, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Along dim 0 of x [C, ..., K, V] with A [C, ...] of any kind (or None): out_0 = h (`initial`, zero when
    None), out_{i+1} = A_i out_i + x_i; with `reverse` the transposed recurrence from the last index down
    (the state gradients), out_{i-1} = A_i^T out_i + x_i. Returns (out, the carry out)."""
    out = torch.empty_like(x)
    h = torch.zeros_like(x[0]) if initial is None else initial.to(x.dtype)
    step = apply_t if reverse else apply
    for i in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
        out[i] = h
        h = x[i] + step(None if A is None else A[i], h)
    return out, h
