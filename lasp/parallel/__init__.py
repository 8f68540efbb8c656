"""Applies TP, SP, PP and DP to a single-device Linear-Llama, in one written order (see `parallelize`)."""

from functools import partial

import torch

from lasp.model.llama import LinearLlama, lm_loss_sum
from lasp.parallel import cpu_shims
from lasp.parallel.batch import local_microbatches
from lasp.parallel.config import ParallelConfig
from lasp.parallel.dp import sync_grads
from lasp.parallel.groups import ParallelGroups, init_groups
from lasp.parallel.pipeline import PipelineStage, forward_backward
from lasp.parallel.sp import apply_sp
from lasp.parallel.tp import apply_tp, megatron_config, vocab_parallel_loss_sum
from lasp.parallel.zero import zero_engine, zero_train_step


def parallelize(model: LinearLlama, cfg: ParallelConfig, groups: ParallelGroups) -> PipelineStage:
    """TP (shard the layers), then SP (fill the mixer slots), then PP (keep this rank's stage).

    `model` must be the same fully built single-device model on every rank (same seed); it is changed in
    place and this rank's stage is returned. Gradients are synchronised by `sync_grads` after each backward.
    """
    cpu_shims.install()
    for name, p in model.named_parameters():
        p.full_name = name
    dtype = next(model.parameters()).dtype
    mcfg = megatron_config(
        cfg.tp, cfg.pp, cfg.sp, dtype, model.cfg.hidden_size, model.cfg.num_layers, model.cfg.num_heads
    )
    apply_tp(model, mcfg, groups.tp, groups.tp_rank, cfg.tp)
    if cfg.sp > 1:
        apply_sp(model, groups.sp, cfg.sp_layout)
    return PipelineStage(model, groups.pp_rank, cfg.pp, mcfg)


def loss_sum_fn(cfg: ParallelConfig, groups: ParallelGroups):
    """Summed token cross-entropy for this layout's logits (vocab-parallel under TP)."""
    if cfg.tp == 1:
        return lm_loss_sum
    return partial(vocab_parallel_loss_sum, group=groups.tp, rank=groups.tp_rank)


def train_step(stage: PipelineStage, tokens: torch.Tensor, cfg: ParallelConfig, groups: ParallelGroups):
    """Forward + backward of one global batch tokens [B, N+1] and the gradient sync. Returns the global
    mean loss on every rank of the last stage (None on other stages)."""
    mbs = local_microbatches(tokens, cfg, groups)
    total = tokens[:, 1:].numel()
    loss = forward_backward(stage, mbs, tokens.shape[1] - 1, loss_sum_fn(cfg, groups), total)
    sync_grads(stage, groups)
    if loss is not None:
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss, group=groups.dp_sp)
    return loss


__all__ = [
    "zero_engine",
    "zero_train_step",
    "ParallelConfig",
    "ParallelGroups",
    "PipelineStage",
    "init_groups",
    "local_microbatches",
    "loss_sum_fn",
    "parallelize",
    "sync_grads",
    "train_step",
]
