"""LASP: exact sequence-parallel linear attention (LASP-2) for very long sequences."""

from lasp.kernels import linear_attn

__all__ = ["linear_attn"]
