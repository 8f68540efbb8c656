"""Sequence-parallel algorithms. They call kernels only through lasp.kernels and take their process
group explicitly."""

from lasp.sp.api import (
    LINEAR_METHODS,
    SOFTMAX_METHODS,
    allscan_linear_attn,
    lasp1_linear_attn,
    lasp2_linear_attn,
    logscan_linear_attn,
    sp_linear_attn,
    sp_softmax_attn,
)
from lasp.sp.lasp2h import lasp2h_softmax_attn
from lasp.sp.layout import LAYOUTS, SeqLayout, shard_sequence, unshard_sequence
from lasp.sp.ring import ring_softmax_attn
from lasp.sp.ring_linear import ring_linear_attn
from lasp.sp.ulysses import ulysses_linear_attn, ulysses_softmax_attn

__all__ = [
    "LAYOUTS",
    "LINEAR_METHODS",
    "SOFTMAX_METHODS",
    "SeqLayout",
    "allscan_linear_attn",
    "lasp1_linear_attn",
    "lasp2_linear_attn",
    "lasp2h_softmax_attn",
    "logscan_linear_attn",
    "ring_linear_attn",
    "ring_softmax_attn",
    "shard_sequence",
    "sp_linear_attn",
    "sp_softmax_attn",
    "ulysses_linear_attn",
    "ulysses_softmax_attn",
    "unshard_sequence",
]
