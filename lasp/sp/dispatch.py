"""The shared entries of the sequence-parallel ops: validate before any communication, pick the layout,
fall back to the single-device op on a group of one, else dispatch."""

from collections.abc import Callable

import torch
from torch import Tensor

from lasp.distributed import group_size
from lasp.kernels import DEFAULT_KERNEL, LinearAttnKernel, linear_attn
from lasp.kernels.linear_attn import check_linear_attn_args
from lasp.kernels.softmax_attn import check_softmax_attn_args, softmax_attn
from lasp.sp.layout import SeqLayout


def check_heads_divisible(H: int, W: int) -> None:
    """Ulysses gives each rank H / W whole heads."""
    if H % W:
        raise ValueError(f"Ulysses splits heads across the group: {H} heads are not divisible by {W} ranks")


def run_sp_linear_attn(
    fn: type[torch.autograd.Function],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group,
    layout: str,
    log_decay: Tensor | None,
    causal: bool,
    scale: float | None,
    kernel: LinearAttnKernel | None,
) -> Tensor:
    """Check every argument before any communication, then run `fn` (an SP autograd Function taking
    q, k, v, log_decay, scale, causal, group, layout, kernel), or `linear_attn` on a group of one."""
    k, v, scale = check_linear_attn_args(q, k, v, log_decay, causal, scale)
    lay = SeqLayout(layout, group_size(group))
    lay.check_local_length(q.shape[1])
    kernel = DEFAULT_KERNEL if kernel is None else kernel
    if lay.world_size == 1:
        return linear_attn(q, k, v, log_decay=log_decay, causal=causal, scale=scale, kernel=kernel)
    return fn.apply(q, k, v, log_decay, scale, causal, group, lay, kernel)


def run_sp_softmax_attn(
    impl: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group,
    layout: str,
    causal: bool,
    scale: float | None,
    heads_divisible: bool = False,
) -> Tensor:
    """Check every argument, then run impl(q, k, v, lay, group, causal, scale), or `softmax_attn` on a
    group of one. `heads_divisible`: the query heads must split evenly across the group (Ulysses)."""
    scale = check_softmax_attn_args(q, k, v, scale)
    lay = SeqLayout(layout, group_size(group))
    lay.check_local_length(q.shape[1])
    if heads_divisible:
        check_heads_divisible(q.shape[2], lay.world_size)
    if lay.world_size == 1:
        return softmax_attn(q, k, v, causal=causal, scale=scale)
    return impl(q, k, v, lay, group, causal, scale)
