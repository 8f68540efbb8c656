"""Choosing the linear-attention kernel: `auto | torch | triton`, decided once and logged.

auto picks Triton when CUDA and the triton package are there, otherwise the PyTorch path. Asking for
Triton without a GPU is an error (never a silent fallback), unless TRITON_INTERPRET=1 asks for Triton's
CPU interpreter, which the tests use. fla: flash-linear-attention's chunk ops behind the same protocol
(lasp.kernels.linear_attn.fla_kernel), on a CUDA GPU only; auto takes it on a GPU for a model whose forms
the Triton kernels lack (a vector gate, the delta rule, document resets), and else the Triton kernels.
"""

import importlib.util
import logging

import torch

from lasp.kernels import settings
from lasp.kernels.linear_attn.chunk import TorchChunkKernel
from lasp.kernels.linear_attn.op import DEFAULT_KERNEL
from lasp.kernels.protocol import Capabilities, LinearAttnKernel

BACKENDS = ("auto", "torch", "triton", "fla")
log = logging.getLogger("lasp.kernels")
_logged: set[tuple[str, str]] = set()


def _triton_kernel() -> LinearAttnKernel:
    from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

    return TritonChunkKernel()


def covers(kernel_caps: Capabilities, needs: Capabilities) -> bool:
    """Whether a kernel with `kernel_caps` computes every form `needs` names."""
    return (
        set(needs.gates) <= set(kernel_caps.gates)
        and (kernel_caps.resets or not needs.resets)
        and (kernel_caps.delta or not needs.delta)
    )


def get_kernel(backend: str = "auto", needs: Capabilities | None = None) -> LinearAttnKernel:
    """The kernel for `backend`; raises a clear error when it cannot run here. `needs` (the forms a model
    runs): on a CUDA GPU, auto takes fla for a model Triton's kernels do not cover, when fla-core is there."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    interpret = settings.TRITON_INTERPRET
    if backend == "fla":
        problems = []
        if importlib.util.find_spec("fla") is None:
            problems.append("the fla-core package (pip install fla-core==0.6.0)")
        if not torch.cuda.is_available():
            problems.append(
                "a CUDA GPU; none is visible (flash-linear-attention's kernels do not run on CPU, not even in "
                "Triton's interpreter: set backend 'torch' or 'auto')"
            )
        if problems:
            raise RuntimeError(f"kernel backend 'fla' needs {' and '.join(problems)}")
        from lasp.kernels.linear_attn.fla_kernel import FlaKernel

        kernel, why = FlaKernel(), "asked"
    elif backend == "triton":
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
        if needs is not None and not covers(kernel.caps, needs) and importlib.util.find_spec("fla") is not None:
            from lasp.kernels.linear_attn.fla_kernel import FlaKernel

            kernel, why = FlaKernel(), "CUDA GPU; the model needs forms Triton's kernels lack"
    if (backend, kernel.name) not in _logged:
        _logged.add((backend, kernel.name))
        log.info("linear-attention kernel backend %r -> %s (%s)", backend, kernel.name, why)
    return kernel


__all__ = ["BACKENDS", "TorchChunkKernel", "get_kernel"]
