"""Data parallelism over the DP x SP ranks, with the gradient all-reduce overlapped with the backward.

Every rank of groups.dp_sp holds the same parameters and a different part of the batch (DP rows, SP
token shards); each microbatch's loss is already its loss sum / the GLOBAL token count, so the gradients
are SUMMED over dp_sp (no averaging).

Why megatron-core's DistributedDataParallel and not torch's: megatron's pipeline schedules run several
forwards before their backwards (1F1B warm-up) and switch synchronisation on only for the last
microbatch's backward through `config.no_sync_func`. torch DDP decides in the FORWARD whether the next
backward reduces (a forward run under `no_sync()` is never reduced, and two forwards outside it before a
backward fail). megatron's DDP decides in the backward: a hook on each parameter's gradient accumulator
adds .grad into a contiguous buffer (`param.main_grad`) and, once every parameter of a bucket is ready in
the last microbatch, starts that bucket's asynchronous all-reduce while the backward goes on. Its first
step learns how many gradients each bucket expects, so the overlap starts at the second step (the first
reduces every bucket at the end); stages after the first have one bucket (megatron: their reduction is
off the critical path).

After the schedule, `finalize_grads` (megatron's `finalize_model_grads_func`) waits for the buckets, adds
the sums megatron does not know about (`tp_partial_grad` over TP, `shared_embedding` over the first/last
stage) and points every `p.grad` at `p.main_grad`, so a plain torch optimizer and clipping work on
`.parameters()`. `zero_grads` (called by `forward_backward_step`) clears them for the next step.
"""

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lasp.parallel.config import ParallelConfig
from lasp.parallel.groups import ParallelGroups


def _all_reduce(grads: list[torch.Tensor], group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _process_groups(groups: ParallelGroups) -> ProcessGroupCollection:
    """Our groups in megatron's collection, so its DDP reads no parallel_state globals."""
    pgs = ProcessGroupCollection()
    pgs.tp, pgs.pp, pgs.dp, pgs.dp_cp = groups.tp, groups.pp, groups.dp, groups.dp_sp
    # expert parameters (allreduce = False, lasp.parallel.ep) are reduced over their own group
    pgs.ep, pgs.expt_dp = groups.ep, groups.expt_dp or groups.dp_sp
    return pgs


class DataParallel(DistributedDataParallel):
    """A pipeline stage under megatron-core DDP over groups.dp_sp. Attributes the wrapper lacks
    (is_first, is_last, set_input_tensor, ...) are read from the stage, so it stands in for it."""

    def __init__(self, stage: nn.Module, groups: ParallelGroups, bucket_size: int | None):
        ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=True,
            bucket_size=bucket_size,
            # .grad must keep the parameter's dtype for a plain torch optimizer, so no fp32 reduce buffer.
            grad_reduce_in_fp32=False,
        )
        # calculate_per_token_loss (set in megatron_config) makes the bucket scaling 1: a plain sum.
        assert stage.config.calculate_per_token_loss
        super().__init__(stage.config, ddp_config, stage, pg_collection=_process_groups(groups))
        self.groups = groups
        stage.config.no_sync_func = self.no_sync
        stage.config.finalize_model_grads_func = self.finalize_grads

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def finalize_grads(self, models=None, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
        """Called by megatron's schedules after the last backward. `num_tokens` (the schedule's token
        count) is ignored: the losses are already divided by the global token count."""
        self.finish_grad_sync()
        params = self.params_with_grad
        _all_reduce([p.main_grad for p in params if getattr(p, "tp_partial_grad", False)], self.groups.tp)
        if self.groups.embedding is not None:
            shared = [p.main_grad for p in params if getattr(p, "shared_embedding", False)]
            _all_reduce(shared, self.groups.embedding)
        for p in params:
            p.grad = p.main_grad

    def zero_grads(self) -> None:
        """Clear .grad and zero the gradient buffers (also resets the buckets' ready counts)."""
        for p in self.params_with_grad:
            p.grad = None  # .grad is a view of the buffer: autograd would add into it, then the hook again
        self.zero_grad_buffer()


def apply_dp(stage: nn.Module, cfg: ParallelConfig, groups: ParallelGroups) -> nn.Module:
    """Wrap this rank's stage in `DataParallel` (ZeRO, zero_stage > 0, is DeepSpeed's engine instead)."""
    if cfg.zero_stage:
        return stage
    return DataParallel(stage, groups, cfg.dp_bucket_size)


def zero_grads(model: nn.Module) -> None:
    """Start a new step's gradients: on a `DataParallel` zeroes its buffers; elsewhere sets .grad None."""
    if isinstance(model, DataParallel):
        model.zero_grads()
    else:
        model.zero_grad(set_to_none=True)
