"""LASP: exact sequence-parallel linear attention (LASP-2) for very long sequences."""

from lasp.kernels import linear_attn
from lasp.sp import SeqLayout, lasp1_linear_attn, lasp2_linear_attn, shard_sequence, unshard_sequence

__all__ = [
    "SeqLayout",
    "lasp1_linear_attn",
    "lasp2_linear_attn",
    "linear_attn",
    "shard_sequence",
    "unshard_sequence",
]
