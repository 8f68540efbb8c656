"""Gradient clipping by the global L2 norm of a model split over TP x SP x PP x DP.

Every distinct parameter of the single-device model is counted once: TP shards (marked `tp_dim`) are
summed over the TP group, TP-duplicated parameters (norm weights; `tp_partial_grad` ones are duplicates
too once their TP sum is done) count on TP rank 0 only, stages are summed over the PP group, and a tied
embedding held by the first and the last stage counts on the first. Experts (`allreduce = False`, lasp.parallel.ep)
differ between the EP ranks and are summed over the EP group. The DP x SP ranks hold the same (already
summed) gradients, so they compute the same norm without communicating.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lasp.parallel.groups import ParallelGroups


def _counted_here(p: nn.Parameter, stage: nn.Module, groups: ParallelGroups) -> bool:
    if getattr(p, "tp_dim", None) is None and groups.tp_rank != 0:
        return False
    return not (getattr(p, "shared_embedding", False) and not stage.is_first)


@torch.no_grad()
def clip_grad_norm_(stage: nn.Module, groups: ParallelGroups, max_norm: float) -> Tensor:
    """The global L2 norm of the gradients of `stage` (a parallelised stage, after the gradient sync),
    the same on every rank; when norm > max_norm every gradient is scaled by max_norm / (norm + 1e-6),
    as torch.nn.utils.clip_grad_norm_ does on one process. max_norm <= 0 only measures.
    Returns the norm, a 0-dim float64 tensor."""
    grads = [p.grad for p in stage.parameters() if p.grad is not None]
    device = grads[0].device if grads else next(stage.parameters()).device
    # squares summed in float64: a bf16 / fp32 sum over billions of elements loses digits
    sq = torch.zeros((), dtype=torch.float64, device=device)
    experts = torch.zeros((), dtype=torch.float64, device=device)
    for p in stage.parameters():
        if p.grad is not None and _counted_here(p, stage, groups):
            if getattr(p, "allreduce", True):
                sq += p.grad.double().square().sum()
            else:
                experts += p.grad.double().square().sum()
    if groups.ep is not None and dist.get_world_size(groups.ep) > 1:
        dist.all_reduce(experts, group=groups.ep)
    sq += experts
    for group in (groups.tp, groups.pp):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    if max_norm > 0 and norm.item() > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm
