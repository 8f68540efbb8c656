"""Thin, explicit-group wrappers over torch.distributed used by the SP algorithms.

Every function takes the process group as an argument (None = the default group). Ranks passed to the
point-to-point helpers are ranks *within* the group.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the *_into_tensor collectives to *_single; older releases only have the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_last_started: str | None = None
_p2p_log: list[int] | None = None


def note_collective(what: str) -> None:
    """Record the collective this rank starts next: a timeout error names the last one (see timeouts.py)."""
    global _last_started
    _last_started = what


def note_p2p(nbytes: int) -> None:
    """Record a point-to-point message this rank receives (see `p2p_log`)."""
    if _p2p_log is not None:
        _p2p_log.append(nbytes)


@contextlib.contextmanager
def p2p_log() -> Iterator[list[int]]:
    """The bytes of every point-to-point message this rank receives inside the block, in order. (The
    profiler records collectives with their shapes, but not the tensor lists of send and recv.)"""
    global _p2p_log
    outer, _p2p_log = _p2p_log, []
    try:
        yield _p2p_log
    finally:
        _p2p_log = outer


def last_collective() -> str | None:
    """The last collective this rank started through lasp.distributed, in words; None before any."""
    return _last_started


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    """World size of `group`; 1 when no process group is initialised."""
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group=None) -> int:
    """Rank within `group`; 0 when no process group is initialised."""
    return dist.get_rank(group) if is_distributed() else 0


_comm_streams: dict[int, "torch.cuda.Stream"] = {}


def comm_stream(device: torch.device) -> "torch.cuda.Stream | None":
    """The side stream collectives of CUDA tensors on `device` are issued on (one per device, made on
    first use); None for CPU tensors, whose collectives (gloo) run on gloo's own threads."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _comm_streams:
        _comm_streams[index] = torch.cuda.Stream(device=index)
    return _comm_streams[index]


class Pending:
    """A collective in flight. `wait()` returns once its output may be used by the current stream: on
    CUDA it makes the current stream wait for the side stream (the host does not block)."""

    def __init__(self, work: dist.Work, stream, out: Tensor):
        self._work, self._stream, self._out = work, stream, out

    def wait(self) -> None:
        self._work.wait()
        if self._stream is not None:
            current = torch.cuda.current_stream(self._out.device)
            current.wait_stream(self._stream)
            self._out.record_stream(current)  # allocated on the side stream, used on this one


def all_gather_async(x: Tensor, group=None) -> tuple[Tensor, Pending]:
    """Start gathering x from every rank along a new leading-major dim 0.

    x [n, ...] -> out [W * n, ...] (rank r's rows at r*n:(r+1)*n), plus the handle to wait on. On CUDA
    the collective is issued on a side stream (`comm_stream`) after the work that produced x, so kernels
    launched before `wait()` run beside it; on CPU the same call runs on gloo's threads.
    """
    x = x.contiguous()
    note_collective(
        f"all-gather of {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} over {group_size(group)} ranks"
    )
    stream = comm_stream(x.device)
    if stream is None:
        out = x.new_empty(group_size(group) * x.shape[0], *x.shape[1:])
        return out, Pending(all_gather_single(out, x, group=group, async_op=True), None, out)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        out = x.new_empty(group_size(group) * x.shape[0], *x.shape[1:])
        work = all_gather_single(out, x, group=group, async_op=True)
    x.record_stream(stream)  # made on the current stream, read on the side stream
    return out, Pending(work, stream, out)


def global_rank(group, rank: int) -> int:
    """The default-group rank of group rank `rank`."""
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, rank)


def send(x: Tensor, dst: int, group=None, tag: int = 0) -> None:
    """Blocking send of x to group rank `dst`."""
    note_collective(f"send of {tuple(x.shape)} to group rank {dst}")
    dist.send(x.contiguous(), dst=global_rank(group, dst), group=group, tag=tag)


def isend(x: Tensor, dst: int, group=None, tag: int = 0) -> dist.Work:
    """Start sending x to group rank `dst`; wait on the returned work before x is changed."""
    note_collective(f"send of {tuple(x.shape)} to group rank {dst}")
    return dist.isend(x.contiguous(), dst=global_rank(group, dst), group=group, tag=tag)


def recv(like: Tensor, src: int, group=None, tag: int = 0) -> Tensor:
    """Blocking receive, from group rank `src`, of a tensor shaped like `like`."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    note_collective(f"receive of {tuple(like.shape)} from group rank {src}")
    note_p2p(out.numel() * out.element_size())
    dist.recv(out, src=global_rank(group, src), group=group, tag=tag)
    return out


def exchange(sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]], group=None) -> list[Tensor]:
    """One round of point-to-point messages, all in flight at once: sends (x, dst, tag), receives (out, src,
    tag) into the contiguous tensors `out`; returns them in the order of `recvs`."""
    ops, outs = [], []
    for x, dst, tag in sends:
        ops.append(dist.P2POp(dist.isend, x.contiguous(), global_rank(group, dst), group, tag))
    for out, src, tag in recvs:
        note_p2p(out.numel() * out.element_size())
        ops.append(dist.P2POp(dist.irecv, out, global_rank(group, src), group, tag))
        outs.append(out)
    if ops:
        note_collective(f"a round of {len(sends)} sends and {len(recvs)} receives")
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return outs
