"""Blocks of a [B, T, H, D] sequence for the chunked PyTorch paths (constant decay, gates, the delta rule),
and the block sizes every family shares."""

import torch
import torch.nn.functional as F
from torch import Tensor

VECTOR_BLOCK = 16
"""At most this many tokens per block where a vector gate needs the exact pairwise weight ([C, C, K])."""
FACTOR_SPAN = 30.0
"""A vector gate summing to no less than -FACTOR_SPAN over every block is factored: q exp(G) and k exp(-G)
stay within exp(30) ~ 1e13, neither overflowing nor losing the product."""


class Blocks:
    """Views [B, T, H, D] tensors a segment of blocks at a time as [n, B, H, C, D] (copied per segment so
    the working set stays small). The sequence is front-padded with zeros to whole blocks: padding adds
    nothing to any state and keeps decay exponents measured from the true end."""

    def __init__(self, T: int, C: int, seg_blocks: int, dtype: torch.dtype):
        self.T, self.C, self.dtype = T, C, dtype
        self.pad = (-T) % C
        n_blocks = (T + self.pad) // C
        self.segments = [slice(i, min(i + seg_blocks, n_blocks)) for i in range(0, n_blocks, seg_blocks)]
        self.n_blocks = n_blocks

    def _tokens(self, s: slice) -> tuple[int, int, int]:
        lo, hi = s.start * self.C - self.pad, s.stop * self.C - self.pad
        return max(lo, 0), hi, max(-lo, 0)

    def get(self, x_BTHD: Tensor, s: slice) -> Tensor:
        lo, hi, front = self._tokens(s)
        x = x_BTHD[:, lo:hi].to(self.dtype)
        if front:
            x = F.pad(x, (0, 0, 0, 0, front, 0))
        B, _, H, D = x.shape
        return x.view(B, s.stop - s.start, self.C, H, D).permute(1, 0, 3, 2, 4).contiguous()

    def put(self, out_BTHD: Tensor, s: slice, x_nBHCD: Tensor) -> None:
        lo, hi, front = self._tokens(s)
        n, B, H, C, D = x_nBHCD.shape
        x = x_nBHCD.permute(1, 0, 3, 2, 4).reshape(B, n * C, H, D)
        out_BTHD[:, lo:hi] = x[:, front:]
