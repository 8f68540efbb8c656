"""Sequence parallelism: fill every mixer's slot with the SP op on the SP group, on one layout."""

from functools import partial

from torch import nn

from lasp.kernels import LinearAttnKernel
from lasp.model.llama import DeltaNetAttention, LinearAttention, LinearLlama, SoftmaxAttention
from lasp.sp import sp_linear_attn, sp_softmax_attn
from lasp.sp.halo import halo_rows


def apply_sp(model: LinearLlama, group, layout: str, linear: str = "lasp2", softmax: str = "lasp2h") -> None:
    """Linear mixers run `linear` (lasp.sp.sp_linear_attn's methods: LASP-2 by default), softmax mixers
    `softmax` (LASP-2H by default), all on `group` with `layout` ("auto": the cost model's pick per layer
    shape); the delta rule's short convolutions and the linear layers' windows get the rows before each
    local chunk from their owners (lasp.sp.halo), and attention transfer's teacher (every mixer's own
    softmax) runs the softmax method. The data must be split once with `shard_sequence(..., layout=layout)`,
    positions included."""
    for block in model.layers:
        if isinstance(block.mixer, SoftmaxAttention):
            block.mixer.attn_fn = partial(sp_softmax_attn, method=softmax, group=group, layout=layout)
        else:
            block.mixer.attn_fn = partial(sp_linear_attn, method=linear, group=group, layout=layout)
        block.mixer.teacher_fn = partial(sp_softmax_attn, method=softmax, group=group, layout=layout)
        if isinstance(block.mixer, (DeltaNetAttention, LinearAttention)):
            block.mixer.halo_fn = partial(halo_rows, group=group, layout=layout)


def apply_kernel(module: nn.Module, kernel: LinearAttnKernel) -> int:
    """Every linear mixer inside `module` calls its attention with `kernel` (lasp.kernels.get_kernel);
    returns how many mixers. Works before or after `apply_sp`."""
    mixers = [m for m in module.modules() if isinstance(m, (LinearAttention, DeltaNetAttention))]
    for m in mixers:
        m.attn_fn = partial(m.attn_fn, kernel=kernel)
    return len(mixers)
