"""Activation checkpointing per layer: a checkpointed block keeps only its input and recomputes its
activations (collectives included) in the backward."""

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from lasp.model.llama import LinearLlama


def _checkpointed(forward, *args):
    # non-reentrant: works with inputs that need no grad and with megatron's TP autograd functions
    return checkpoint(forward, *args, use_reentrant=False)


def apply_ac(model: LinearLlama, every: int) -> int:
    """Checkpoint every `every`-th block (layers 0, every, 2 every, ...; every=1 is full checkpointing,
    0 none). Apply it to the single-device model, before `parallelize`. Returns how many blocks."""
    if every < 0:
        raise ValueError(f"activation checkpointing interval must be >= 0, got {every}")
    if every == 0:
        return 0
    blocks: list[nn.Module] = [b for i, b in enumerate(model.layers) if i % every == 0]
    for block in blocks:
        block.forward = partial(_checkpointed, block.forward)
    return len(blocks)
