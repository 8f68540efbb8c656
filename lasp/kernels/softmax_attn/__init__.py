"""Softmax attention on one device: torch SDPA (flash / memory-efficient on GPU) and a block form that
also returns the log-sum-exp, for merging partial results (Ring Attention)."""

from lasp.kernels.softmax_attn.ops import (
    attn_block_bwd,
    attn_with_lse,
    check_softmax_attn_args,
    merge_partials,
    softmax_attn,
)

__all__ = ["attn_block_bwd", "attn_with_lse", "check_softmax_attn_args", "merge_partials", "softmax_attn"]
