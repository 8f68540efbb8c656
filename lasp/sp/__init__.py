"""Sequence-parallel algorithms. They call kernels only through the protocol in lasp.kernels.protocol
and take their process group explicitly."""

from lasp.sp.lasp1 import lasp1_linear_attn
from lasp.sp.lasp2 import lasp2_linear_attn
from lasp.sp.layout import LAYOUTS, SeqLayout, shard_sequence, unshard_sequence

__all__ = ["LAYOUTS", "SeqLayout", "lasp1_linear_attn", "lasp2_linear_attn", "shard_sequence", "unshard_sequence"]
