"""The few things megatron-core needs to run on a CPU-only torch. Active only when CUDA is absent;
on a GPU `install()` does nothing.
"""

import torch
from torch.overrides import TorchFunctionMode

_installed = False


class _CudaToCpu(TorchFunctionMode):
    """megatron's pipeline schedules create small bookkeeping tensors with device="cuda" (token counts):
    send them to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def install() -> None:
    """Patch what megatron-core calls that a CPU-only torch cannot answer (idempotent)."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    # megatron asks for the current CUDA device to place buffers; there is one device here, the CPU.
    torch.cuda.current_device = lambda: "cpu"
    _installed = True


def cuda_to_cpu() -> TorchFunctionMode | None:
    """A mode to run megatron's schedules under on CPU (None with CUDA, where nothing needs redirecting)."""
    return None if torch.cuda.is_available() else _CudaToCpu()
