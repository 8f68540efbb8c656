"""Choosing the linear-attention kernel: `auto | torch | triton`, decided once and logged.

auto picks Triton when CUDA and the triton package are there, otherwise the PyTorch path. Asking for
Triton without a GPU is an error (never a silent fallback), unless TRITON_INTERPRET=1 asks for Triton's
CPU interpreter, which the tests use.
"""

import importlib.util
import logging

import torch

from lasp.kernels import settings
from lasp.kernels.linear_attn.chunk import TorchChunkKernel
from lasp.kernels.linear_attn.op import DEFAULT_KERNEL
from lasp.kernels.protocol import LinearAttnKernel

BACKENDS = ("auto", "torch", "triton")
log = logging.getLogger("lasp.kernels")
_logged: set[str] = set()


def _triton_kernel() -> LinearAttnKernel:
    from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

    return TritonChunkKernel()


def get_kernel(backend: str = "auto") -> LinearAttnKernel:
    """The kernel for `backend`; raises a clear error when it cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    interpret = settings.TRITON_INTERPRET
    if backend == "triton":
        if not has_triton:
            raise RuntimeError("kernel backend 'triton' needs the triton package (pip install triton)")
        if not torch.cuda.is_available() and not interpret:
            raise RuntimeError(
                "kernel backend 'triton' needs a CUDA GPU; none is visible (set backend 'torch' or 'auto', "
                "or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)"
            )
        kernel, why = _triton_kernel(), "interpreter" if interpret and not torch.cuda.is_available() else "CUDA"
    elif backend == "torch" or not (has_triton and torch.cuda.is_available()):
        kernel, why = DEFAULT_KERNEL, "asked" if backend == "torch" else "no CUDA GPU or no triton"
    else:
        kernel, why = _triton_kernel(), "CUDA GPU and triton present"
    if backend not in _logged:
        _logged.add(backend)
        log.info("linear-attention kernel backend %r -> %s (%s)", backend, kernel.name, why)
    return kernel


__all__ = ["BACKENDS", "TorchChunkKernel", "get_kernel"]
