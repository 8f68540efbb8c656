"""The few things megatron-core needs to run on a CPU-only torch. Active only when CUDA is absent;
on a GPU `install()` does nothing.
"""

import contextlib
from functools import partial

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


class _HostEvent:
    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _HostStream:
    """A CUDA stream stand-in on a CPU-only torch: the host runs everything in order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return _HostEvent()

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def _host_splits(tensor, as_numpy: bool = False, record_stream: bool = False):
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _uneven_gather(even, input_, group, output_split_sizes=None, use_global_buffer=False):
    if output_split_sizes is None or group.size() == 1:
        return even(input_, group, output_split_sizes, use_global_buffer)
    sizes = [int(n) for n in output_split_sizes]
    padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _uneven_reduce_scatter(even, input_, group, input_split_sizes=None, use_global_buffer=False):
    if input_split_sizes is None or group.size() == 1:
        return even(input_, group, input_split_sizes, use_global_buffer)
    total = input_.contiguous().clone()
    torch.distributed.all_reduce(total, group=group)
    return list(torch.split(total, [int(n) for n in input_split_sizes]))[group.rank()].contiguous()


def install() -> None:
    """Patch what megatron-core calls that a CPU-only torch cannot answer (idempotent)."""
    global _installed
    if _installed:
        return
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16 names te_general_gemm in the router's linear without defining it when Transformer
    # Engine is absent (on a GPU too): absent means the plain torch.mm path
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if torch.cuda.is_available():
        _installed = True
        return
    # megatron asks for the current CUDA device to place buffers; there is one device here, the CPU.
    torch.cuda.current_device = lambda: "cpu"
    # megatron's all-to-all token dispatcher copies its split sizes to the host on a side stream and waits
    # on an event: on the CPU everything is already on the host and in order, so streams and events are
    # no-ops
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # ... and hands those split sizes to all_to_all_single as numpy arrays, converted on the way to the
    # host: already on the host, they stayed tensors, which the binding refuses
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_splits
    # with expert TP the dispatcher gathers and reduce-scatters uneven token counts over the TP group;
    # gloo's all_gather takes equal sizes only and its reduce_scatter no list: pad, or reduce it all
    from megatron.core.tensor_parallel import mappings

    _even = (mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim)
    mappings._gather_along_first_dim = partial(_uneven_gather, _even[0])
    mappings._reduce_scatter_along_first_dim = partial(_uneven_reduce_scatter, _even[1])
    _installed = True


def cuda_to_cpu() -> TorchFunctionMode | None:
    """A mode to run megatron's schedules under on CPU (None with CUDA, where nothing needs redirecting)."""
    return None if torch.cuda.is_available() else _CudaToCpu()
