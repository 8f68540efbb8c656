"""Single-device math. Nothing here knows about ranks or process groups."""

from lasp.kernels.backend import BACKENDS, get_kernel
from lasp.kernels.linear_attn import (
    DEFAULT_KERNEL,
    TorchChunkKernel,
    linear_attn,
    quadratic_linear_attn,
    recurrent_linear_attn,
)
from lasp.kernels.protocol import LinearAttnKernel, state_dtype

__all__ = [
    "BACKENDS",
    "get_kernel",
    "DEFAULT_KERNEL",
    "LinearAttnKernel",
    "TorchChunkKernel",
    "linear_attn",
    "quadratic_linear_attn",
    "recurrent_linear_attn",
    "state_dtype",
]
