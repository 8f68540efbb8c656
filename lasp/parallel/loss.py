"""The LM head and loss of the last pipeline stage, chunked over tokens (lasp.model.loss), with the
vocabulary split over the TP group when tp > 1.

Legend: B batch, T local tokens, D hidden, V vocabulary.
"""

import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
)
from torch import Tensor, nn

from lasp.model.loss import chunked_lm_loss_sum


def vocab_parallel_chunked_loss_sum(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_tokens: int, group, rank: int
) -> Tensor:
    """Summed cross-entropy of hidden [B, T, D] through this rank's vocabulary shard weight [V/tp, D] of a
    column-parallel LM head (rows rank * V/tp onwards), labels [B, T] (-100 ignored).

    Every TP rank returns the same loss (two all-reduces per call, whatever the number of chunks). The
    hidden input goes through megatron's copy-to-TP-region, as in the column-parallel layer, so its
    gradient is summed over the shards; the weight gradient stays this rank's shard.
    """

    def reduce_max(x: Tensor) -> Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x

    def reduce_sum(x: Tensor) -> Tensor:
        dist.all_reduce(x, group=group)
        return x

    hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    return chunked_lm_loss_sum(
        hidden, weight, labels, chunk_tokens=chunk_tokens, vocab_start=rank * weight.shape[0],
        reduce_max=reduce_max, reduce_sum=reduce_sum,
    )


class LMHeadLoss(nn.Module):
    """The last stage's LM head and loss: (hidden [B, T, D], head weight [V or V/tp, D], labels [B, T])
    -> summed cross-entropy, `chunk_tokens` tokens at a time, vocab-parallel over `group` when given.

    It owns no parameter (the weight stays the head's, so checkpoints keep their names). It is a module
    and not a function for ZeRO-3, which gathers a module's parameters only while that module runs,
    forward and backward: `zero_engine` registers the head's weight as this module's external parameter.
    """

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_tokens: int, group=None,
                rank: int = 0) -> Tensor:
        if group is None:
            return chunked_lm_loss_sum(hidden, weight, labels, chunk_tokens=chunk_tokens)
        return vocab_parallel_chunked_loss_sum(hidden, weight, labels, chunk_tokens=chunk_tokens, group=group,
                                               rank=rank)


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
