"""Sequence parallelism: fill every mixer's slot with the SP op on the SP group, on one layout."""

from functools import partial

from torch import nn

from lasp.kernels import LinearAttnKernel
from lasp.model.llama import DeltaNetAttention, LinearAttention, LinearLlama, SoftmaxAttention
from lasp.sp import lasp2_linear_attn, lasp2h_softmax_attn
from lasp.sp.halo import halo_rows


def apply_sp(model: LinearLlama, group, layout: str) -> None:
    """Linear mixers run LASP-2, softmax mixers LASP-2H, all on `group` with `layout`; the delta rule's
    short convolutions and the linear layers' windows get the rows before each local chunk from their
    owners (lasp.sp.halo), and attention transfer's teacher (every mixer's own softmax) runs LASP-2H. The
    data must be split once with `shard_sequence(..., layout=layout)`, positions included."""
    for block in model.layers:
        op = lasp2h_softmax_attn if isinstance(block.mixer, SoftmaxAttention) else lasp2_linear_attn
        block.mixer.attn_fn = partial(op, group=group, layout=layout)
        block.mixer.teacher_fn = partial(lasp2h_softmax_attn, group=group, layout=layout)
        if isinstance(block.mixer, (DeltaNetAttention, LinearAttention)):
            block.mixer.halo_fn = partial(halo_rows, group=group, layout=layout)


def apply_kernel(module: nn.Module, kernel: LinearAttnKernel) -> int:
    """Every linear mixer inside `module` calls its attention with `kernel` (lasp.kernels.get_kernel);
    returns how many mixers. Works before or after `apply_sp`."""
    mixers = [m for m in module.modules() if isinstance(m, (LinearAttention, DeltaNetAttention))]
    for m in mixers:
        m.attn_fn = partial(m.attn_fn, kernel=kernel)
    return len(mixers)
