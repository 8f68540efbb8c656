"""Sequence parallelism: fill every mixer's slot with the SP op on the SP group, on one layout."""

from functools import partial

from lasp.model.llama import LinearAttention, LinearLlama
from lasp.sp import lasp2_linear_attn, lasp2h_softmax_attn


def apply_sp(model: LinearLlama, group, layout: str) -> None:
    """Linear mixers run LASP-2, softmax mixers LASP-2H, all on `group` with `layout`. The data must be
    split once with `shard_sequence(..., layout=layout)`, positions included."""
    for block in model.layers:
        op = lasp2_linear_attn if isinstance(block.mixer, LinearAttention) else lasp2h_softmax_attn
        block.mixer.attn_fn = partial(op, group=group, layout=layout)
