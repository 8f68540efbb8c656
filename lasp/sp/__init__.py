"""Sequence-parallel algorithms. They call kernels only through lasp.kernels and take their process
group explicitly."""

from lasp.sp.lasp1 import lasp1_linear_attn
from lasp.sp.lasp2 import lasp2_linear_attn
from lasp.sp.lasp2h import lasp2h_softmax_attn
from lasp.sp.layout import LAYOUTS, SeqLayout, shard_sequence, unshard_sequence
from lasp.sp.ring import ring_softmax_attn
from lasp.sp.ring_linear import ring_linear_attn
from lasp.sp.ulysses import ulysses_linear_attn, ulysses_softmax_attn

__all__ = [
    "LAYOUTS",
    "SeqLayout",
    "lasp1_linear_attn",
    "lasp2_linear_attn",
    "lasp2h_softmax_attn",
    "ring_linear_attn",
    "ring_softmax_attn",
    "shard_sequence",
    "ulysses_linear_attn",
    "ulysses_softmax_attn",
    "unshard_sequence",
]
