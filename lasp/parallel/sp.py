"""Sequence parallelism: fill every mixer's slot with the SP op on the SP group, on one layout."""

from functools import partial

from torch import nn

from lasp.kernels import LinearAttnKernel
from lasp.model.llama import LinearAttention, LinearLlama
from lasp.sp import lasp2_linear_attn, lasp2h_softmax_attn


def apply_sp(model: LinearLlama, group, layout: str) -> None:
    """Linear mixers run LASP-2, softmax mixers LASP-2H, all on `group` with `layout`. The data must be
    split once with `shard_sequence(..., layout=layout)`, positions included."""
    for block in model.layers:
        op = lasp2_linear_attn if isinstance(block.mixer, LinearAttention) else lasp2h_softmax_attn
        block.mixer.attn_fn = partial(op, group=group, layout=layout)


def apply_kernel(module: nn.Module, kernel: LinearAttnKernel) -> int:
    """Every linear mixer inside `module` calls its attention with `kernel` (lasp.kernels.get_kernel);
    returns how many mixers. Works before or after `apply_sp`."""
    mixers = [m for m in module.modules() if isinstance(m, LinearAttention)]
    for m in mixers:
        m.attn_fn = partial(m.attn_fn, kernel=kernel)
    return len(mixers)
