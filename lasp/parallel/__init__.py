"""Applies TP, SP, PP and DP to a single-device Linear-Llama, in one written order (see `parallelize`)."""

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from lasp.model.llama import LinearLlama, lm_loss_sum
from lasp.parallel import cpu_shims
from lasp.parallel.batch import local_microbatches
from lasp.parallel.clip import clip_grad_norm_
from lasp.parallel.config import ParallelConfig
from lasp.parallel.dp import DataParallel, apply_dp, zero_grads
from lasp.parallel.ep import apply_ep, set_aux_scale
from lasp.parallel.groups import ParallelGroups, init_groups
from lasp.parallel.loss import attention_transfer, distillation, transfer_loss_sum
from lasp.parallel.pipeline import PipelineStage, forward_backward
from lasp.parallel.sp import apply_sp
from lasp.parallel.tp import apply_tp, megatron_config, vocab_parallel_loss_sum
from lasp.parallel.zero import zero_engine, zero_eval_step, zero_train_step
from lasp.sp.cost import use_link


def parallelize(
    model: LinearLlama, cfg: ParallelConfig, groups: ParallelGroups, frozen: frozenset[str] = frozenset()
) -> DataParallel | PipelineStage:
    """TP (shard the layers), then EP (the MoE layers in megatron's MoELayer), then SP (fill the mixer
    slots), then PP (keep this rank's stage), then DP.

    `model` must be the same fully built single-device model on every rank (same seed); it is changed in
    place and this rank's stage is returned, wrapped in `DataParallel` (it reads like the stage: is_first,
    is_last, parameters()) unless cfg.zero_stage > 0 (then wrap it with `zero_engine`). Gradients are
    summed during the backward of `forward_backward_step`. `frozen`: the full names of the parameters that
    do not train (requires_grad False on every shard).
    """
    cpu_shims.install()
    for name, p in model.named_parameters():
        p.full_name = name
    dtype = next(model.parameters()).dtype
    mcfg = megatron_config(
        cfg.tp, cfg.pp, cfg.sp, dtype, model.cfg.hidden_size, model.cfg.num_layers, model.cfg.num_heads
    )
    apply_tp(model, mcfg, groups.tp, groups.tp_rank, cfg.tp)
    apply_ep(model, cfg, groups)
    if cfg.sp > 1:
        if cfg.sp_link != "calibrate":
            use_link(cfg.sp_link)
        apply_sp(model, groups.sp, cfg.sp_layout, cfg.sp_method.linear, cfg.sp_method.softmax)
    stage = PipelineStage(model, groups.pp_rank, cfg.pp, mcfg)
    for p in stage.parameters():  # after TP, whose layers hold new parameters; before DP sizes its buffers
        p.requires_grad_(p.full_name not in frozen)
    return apply_dp(stage, cfg, groups)


def loss_sum_fn(cfg: ParallelConfig, groups: ParallelGroups, stage: nn.Module):
    """(output of the last `stage`, labels [b, T_local]) -> summed token cross-entropy (vocab-parallel
    under TP). The stage's output is its normed hidden states: the LM head runs inside the loss, chunked
    by cfg.loss_chunk_tokens (stages built with logits=True get the plain loss of their logits). A stage
    switched to attention transfer (lasp.parallel.loss.attention_transfer) gets its mixers' errors instead."""
    mixers = getattr(stage, "transfer_mixers", None)
    if mixers:  # attention transfer: the output and labels do not matter, the mixers' records do
        group = groups.tp if cfg.tp > 1 else None
        return lambda hidden, labels: transfer_loss_sum(mixers, group)
    if stage.logits:
        return lm_loss_sum if cfg.tp == 1 else partial(vocab_parallel_loss_sum, group=groups.tp, rank=groups.tp_rank)

    def loss_sum(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # the head is read at call time: only the last stage has one
        teacher = getattr(stage, "teacher_hidden", None)  # distillation, in training (lasp.parallel.loss)
        distill = getattr(stage, "distill_weight", 0.0) if teacher is not None else 0.0
        return stage.head_loss(
            hidden,
            stage.lm_head.weight,
            labels,
            chunk_tokens=cfg.loss_chunk_tokens,
            group=groups.tp if cfg.tp > 1 else None,
            rank=groups.tp_rank,
            teacher=teacher,
            distill_weight=distill,
        )

    return loss_sum


def _global_loss(share: torch.Tensor | None, stage: nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """The last stage's loss share summed over DP x SP, then sent to every stage: a 0-dim float64."""
    device = next(stage.parameters()).device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    if stage.is_last:
        loss += share.detach()
        dist.all_reduce(loss, group=groups.dp_sp)
    if dist.get_world_size(groups.pp) > 1:
        dist.broadcast(loss, group=groups.pp, group_src=dist.get_world_size(groups.pp) - 1)
    return loss


def _run(
    stage: nn.Module,
    microbatches: list[dict],
    cfg: ParallelConfig,
    groups: ParallelGroups,
    total_tokens: int,
    forward_only: bool,
) -> torch.Tensor:
    seq_len = microbatches[0]["tokens"].shape[1] * cfg.sp  # megatron sizes its stage-to-stage messages from it
    set_aux_scale(cfg, total_tokens)
    share = forward_backward(stage, microbatches, seq_len, loss_sum_fn(cfg, groups, stage), total_tokens, forward_only)
    return _global_loss(share, stage, groups)


def forward_backward_step(
    stage: DataParallel, microbatches: list[dict], cfg: ParallelConfig, groups: ParallelGroups, total_tokens: int
) -> torch.Tensor:
    """Forward + backward of this rank's microbatches ({tokens, positions, labels} [b, T_local] int64, from
    `local_microbatches`) with the gradient sync overlapped; previous gradients are cleared first
    (`zero_grads`). Afterwards every parameter's .grad holds the gradient of the global mean loss (loss
    sums / `total_tokens`). Returns that loss, a 0-dim float64 tensor, on every rank."""
    if not isinstance(stage, DataParallel):
        raise ValueError(
            "forward_backward_step needs the DataParallel stage from parallelize with "
            f"parallel.zero_stage 0 (got zero_stage {cfg.zero_stage}: use zero_train_step)"
        )
    zero_grads(stage)
    return _run(stage, microbatches, cfg, groups, total_tokens, forward_only=False)


@torch.no_grad()
def eval_step(
    stage: nn.Module, microbatches: list[dict], cfg: ParallelConfig, groups: ParallelGroups, total_tokens: int
) -> torch.Tensor:
    """Forward only of this rank's microbatches (as in `forward_backward_step`); gradients are untouched.
    Returns the global mean loss (loss sums / `total_tokens`), a 0-dim float64 tensor, on every rank."""
    return _run(stage, microbatches, cfg, groups, total_tokens, forward_only=True)


def train_step(
    stage: DataParallel, tokens: torch.Tensor, cfg: ParallelConfig, groups: ParallelGroups, eos_id: int | None = None
):
    """Forward + backward of one global batch tokens [B, N+1] (the same on every rank) and the gradient
    sync. Returns the global mean loss (0-dim float64) on every rank. `eos_id`: packed documents, reset
    after every EOS (see `local_microbatches`)."""
    mbs = local_microbatches(tokens, cfg, groups, eos_id)
    return forward_backward_step(stage, mbs, cfg, groups, tokens[:, 1:].numel())


__all__ = [
    "DataParallel",
    "apply_dp",
    "attention_transfer",
    "distillation",
    "clip_grad_norm_",
    "eval_step",
    "forward_backward_step",
    "zero_grads",
    "zero_engine",
    "zero_eval_step",
    "zero_train_step",
    "ParallelConfig",
    "ParallelGroups",
    "PipelineStage",
    "init_groups",
    "local_microbatches",
    "loss_sum_fn",
    "parallelize",
    "train_step",
]
