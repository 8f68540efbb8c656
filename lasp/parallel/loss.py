"""The LM head and loss of the last pipeline stage, chunked over tokens (lasp.model.loss), with the
vocabulary split over the TP group when tp > 1.

Legend: B batch, T local tokens, D hidden, V vocabulary.
"""

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import Tensor, nn

from lasp.model.loss import chunked_kl_sum, chunked_lm_loss_sum


def vocab_parallel_chunked_loss_sum(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_tokens: int,
    group,
    rank: int,
    teacher: Tensor | None = None,
    distill_weight: float = 0.0,
) -> Tensor:
    """Summed cross-entropy of hidden [B, T, D] through this rank's vocabulary shard weight [V/tp, D] of a
    column-parallel LM head (rows rank * V/tp onwards), labels [B, T] (-100 ignored).

    Every TP rank returns the same loss (two all-reduces per call, whatever the number of chunks). The
    hidden input goes through megatron's copy-to-TP-region, as in the column-parallel layer, so its
    gradient is summed over the shards; the weight gradient stays this rank's shard. With `distill_weight`,
    plus that times the summed KL(teacher || model), `teacher` being the teacher's hidden states.
    """

    def reduce_max(x: Tensor) -> Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x

    def reduce_sum(x: Tensor) -> Tensor:
        dist.all_reduce(x, group=group)
        return x

    hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    loss = chunked_lm_loss_sum(
        hidden,
        weight,
        labels,
        chunk_tokens=chunk_tokens,
        vocab_start=rank * weight.shape[0],
        reduce_max=reduce_max,
        reduce_sum=reduce_sum,
    )
    if distill_weight:
        kl = chunked_kl_sum(
            hidden, teacher, weight, labels, chunk_tokens=chunk_tokens, reduce_max=reduce_max, reduce_sum=reduce_sum
        )
        loss = loss + distill_weight * kl
    return loss


class LMHeadLoss(nn.Module):
    """The last stage's LM head and loss: (hidden [B, T, D], head weight [V or V/tp, D], labels [B, T])
    -> summed cross-entropy, `chunk_tokens` tokens at a time, vocab-parallel over `group` when given; plus
    distill_weight x the summed KL to the `teacher` hidden states' logits when distilling.

    It owns no parameter (the weight stays the head's, so checkpoints keep their names). It is a module
    and not a function for ZeRO-3, which gathers a module's parameters only while that module runs,
    forward and backward: `zero_engine` registers the head's weight as this module's external parameter.
    """

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        chunk_tokens: int,
        group=None,
        rank: int = 0,
        teacher: Tensor | None = None,
        distill_weight: float = 0.0,
    ) -> Tensor:
        if group is None:
            loss = chunked_lm_loss_sum(hidden, weight, labels, chunk_tokens=chunk_tokens)
            if distill_weight:
                loss = loss + distill_weight * chunked_kl_sum(
                    hidden, teacher, weight, labels, chunk_tokens=chunk_tokens
                )
            return loss
        return vocab_parallel_chunked_loss_sum(
            hidden,
            weight,
            labels,
            chunk_tokens=chunk_tokens,
            group=group,
            rank=rank,
            teacher=teacher,
            distill_weight=distill_weight,
        )


def attention_transfer(stage: nn.Module) -> list[nn.Module]:
    """Switch every linear mixer of `stage` (a model or a pipeline stage) to attention transfer: each forward
    records its squared error against its softmax teacher and passes the teacher's output on (see
    `_Projections.transferred`). The records are cleared when `stage` starts a forward, so an activation
    checkpoint's recomputation in the backward leaves nothing behind. Returns the mixers, also kept as
    `stage.transfer_mixers` (which `transfer_loss_sum` reads)."""
    from lasp.model.llama import DeltaNetAttention, LinearAttention

    mixers = [m for m in stage.modules() if isinstance(m, (LinearAttention, DeltaNetAttention))]
    for m in mixers:
        m.transfer = []

    def clear(module, args):
        for m in mixers:
            m.transfer.clear()

    stage.register_forward_pre_hook(clear)
    stage.transfer_mixers = mixers
    return mixers


def transfer_loss_sum(mixers: list[nn.Module], group=None) -> Tensor:
    """The squared errors the mixers recorded in the forward just run, summed (and taken), summed over the
    TP `group` when given (each rank holds its heads' errors; the gradient passes straight through)."""
    total = sum(e for m in mixers for e in m.transfer)
    for m in mixers:
        m.transfer.clear()
    return total if group is None else reduce_from_tensor_model_parallel_region(total, group=group)


def distillation(stage: nn.Module, weight: float) -> None:
    """KL distillation of `stage` (the only pipeline stage) to the original softmax model: before each of its
    forwards, the same forward as that teacher (lasp.model.llama.softmax_teacher) without gradients, whose
    final hidden states `loss_sum_fn` reads as `stage.teacher_hidden`; the loss adds `weight` x the summed
    KL(teacher || model) over the tokens. Forwards without gradients (evaluations) skip it: their loss is
    the LM loss alone."""
    from lasp.model.llama import softmax_teacher

    def run_teacher(module, args, kwargs):
        if not torch.is_grad_enabled():  # an evaluation: the LM loss alone
            module.teacher_hidden = None
            return
        with torch.no_grad(), softmax_teacher(module):
            module.teacher_hidden = module.forward(*args, **kwargs)

    stage.register_forward_pre_hook(run_teacher, with_kwargs=True)
    stage.distill_weight = weight
