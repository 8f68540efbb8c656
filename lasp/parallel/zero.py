"""DeepSpeed ZeRO (stages 1-3) as the data-parallel option, over the DP x SP ranks.

DeepSpeed averages gradients over its data-parallel group, so each rank's loss is its local token mean
(every rank holds the same number of tokens): the average is the global mean's gradient. Its group is
megatron's DP x SP group, handed over through a small `mpu` adapter. It is used with pp = 1.
"""

import torch
import torch.distributed as dist
from torch import nn

from lasp.parallel.config import ParallelConfig
from lasp.parallel.groups import ParallelGroups


class _Mpu:
    """The process-group questions DeepSpeed asks (its `mpu` interface), answered from our mesh."""

    def __init__(self, groups: ParallelGroups):
        self.g = groups

    def get_data_parallel_group(self):
        return self.g.dp_sp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.g.dp_sp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self.g.dp_sp)

    def get_model_parallel_group(self):
        return self.g.tp

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.g.tp)

    def get_model_parallel_rank(self):
        return self.g.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def zero_engine(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ParallelConfig,
    groups: ParallelGroups,
    micro_batch: int,
    grad_clip: float = 0.0,
):
    """Wrap `module` and a plain torch optimizer in a DeepSpeed engine with ZeRO `cfg.zero_stage`;
    DeepSpeed clips the global gradient norm to `grad_clip` (0: no clipping) inside its step."""
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.microbatches,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "gradient_clipping": grad_clip,
    }
    if cfg.zero_stage == 3 and getattr(module, "head_loss", None) is not None:
        # the chunked loss reads the head's weight without calling the head: gather it for the loss
        deepspeed.zero.register_external_parameter(module.head_loss, module.lm_head.weight)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config, mpu=_Mpu(groups), dist_init_required=False
    )
    return engine


def zero_train_step(engine, microbatches: list[dict], loss_sum_fn, groups: ParallelGroups, before_step=None):
    """Forward, backward and optimizer step of one global batch through a ZeRO engine.

    Each microbatch's loss is its local token mean; DeepSpeed divides by the accumulation steps and
    averages over DP x SP, which makes it the global mean. `before_step(engine)` runs after the last
    backward, while the full gradients can still be read (deepspeed.utils.safe_get_full_grad).
    Returns the global mean loss (every rank).
    """
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for i, mb in enumerate(microbatches):
        out = engine(mb["tokens"], mb["positions"], mb.get("documents"))
        loss = loss_sum_fn(out, mb["labels"]) / (mb["labels"] != -100).sum()
        engine.backward(loss)
        total += loss.detach().double() / len(microbatches)
        if i == len(microbatches) - 1 and before_step is not None:
            before_step(engine)
        engine.step()
    dist.all_reduce(total, group=groups.dp_sp)
    return total / dist.get_world_size(groups.dp_sp)


@torch.no_grad()
def zero_eval_step(engine, microbatches: list[dict], loss_sum_fn, groups: ParallelGroups, total_tokens: int):
    """Forward only through a ZeRO engine (ZeRO-3 gathers the partitioned weights as it goes): the global
    mean loss (loss sums / `total_tokens`), a 0-dim float64 on every rank."""
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for mb in microbatches:
        total += loss_sum_fn(engine(mb["tokens"], mb["positions"], mb.get("documents")), mb["labels"]).double()
    dist.all_reduce(total, group=groups.dp_sp)
    return total / total_tokens
