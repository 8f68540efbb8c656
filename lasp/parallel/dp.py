"""Gradient synchronisation after a backward: sum over the ranks that hold the same parameters."""

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lasp.parallel.groups import ParallelGroups


def _all_reduce(grads: list[torch.Tensor], group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def sync_grads(module: nn.Module, groups: ParallelGroups) -> None:
    """Sum gradients over DP x SP (every replica and every sequence shard), over TP for parameters whose
    gradient covers only local heads, and over the first/last stage for tied embeddings."""
    params = [p for p in module.parameters() if p.grad is not None]
    _all_reduce([p.grad for p in params], groups.dp_sp)
    _all_reduce([p.grad for p in params if getattr(p, "tp_partial_grad", False)], groups.tp)
    if groups.embedding is not None:
        _all_reduce([p.grad for p in params if getattr(p, "shared_embedding", False)], groups.embedding)
