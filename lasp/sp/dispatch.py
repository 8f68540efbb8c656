"""The shared entry of the sequence-parallel linear-attention ops: validate, pick the layout, dispatch."""

import torch
from torch import Tensor

from lasp.distributed import group_size
from lasp.kernels import DEFAULT_KERNEL, LinearAttnKernel, linear_attn
from lasp.kernels.linear_attn import check_linear_attn_args
from lasp.sp.layout import SeqLayout


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
