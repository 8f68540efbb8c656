"""Thin, explicit-group wrappers over torch.distributed used by the SP algorithms.

Every function takes the process group as an argument (None = the default group). Ranks passed to the
point-to-point helpers are ranks *within* the group.
"""

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the *_into_tensor collectives to *_single; older releases only have the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    """World size of `group`; 1 when no process group is initialised."""
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group=None) -> int:
    """Rank within `group`; 0 when no process group is initialised."""
    return dist.get_rank(group) if is_distributed() else 0


def all_gather_async(x: Tensor, group=None) -> tuple[Tensor, dist.Work]:
    """Start gathering x from every rank along a new leading-major dim 0.

    x [n, ...] -> out [W * n, ...] (rank r's rows at r*n:(r+1)*n), plus the handle to wait on.
    """
    x = x.contiguous()
    out = x.new_empty(group_size(group) * x.shape[0], *x.shape[1:])
    return out, all_gather_single(out, x, group=group, async_op=True)


def global_rank(group, rank: int) -> int:
    """The default-group rank of group rank `rank`."""
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, rank)


def send(x: Tensor, dst: int, group=None) -> None:
    """Blocking send of x to group rank `dst`."""
    dist.send(x.contiguous(), dst=global_rank(group, dst), group=group)


def recv(like: Tensor, src: int, group=None) -> Tensor:
    """Blocking receive, from group rank `src`, of a tensor shaped like `like`."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    dist.recv(out, src=global_rank(group, src), group=group)
    return out
