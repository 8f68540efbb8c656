"""Linear attention on one device: chunked PyTorch kernel, references, and the `linear_attn` op."""

from lasp.kernels.linear_attn.chunk import TorchChunkKernel
from lasp.kernels.linear_attn.naive import quadratic_linear_attn, recurrent_linear_attn
from lasp.kernels.linear_attn.op import DEFAULT_KERNEL, check_linear_attn_args, linear_attn

__all__ = [
    "DEFAULT_KERNEL",
    "TorchChunkKernel",
    "check_linear_attn_args",
    "linear_attn",
    "quadratic_linear_attn",
    "recurrent_linear_attn",
]
