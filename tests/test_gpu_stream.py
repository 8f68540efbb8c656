"""LASP-2's all-gather on a CUDA side stream (GPU only): one process in an NCCL group of one, running the
same autograd Function as the CPU tests, against `linear_attn` on the same device."""

import os
import tempfile
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check(rank: int, store_path: str) -> None:
    import torch.distributed as dist

    from lasp.distributed import comm
    from lasp.kernels import get_kernel, linear_attn
    from lasp.sp.core import Job, sp_core
    from lasp.sp.lasp2 import AllGather
    from lasp.sp.layout import SeqLayout

    torch.cuda.set_device(0)
    store = dist.FileStore(store_path, 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        x = torch.randn(3, 5, device="cuda")
        big = torch.randn(4096, 4096, device="cuda")
        out, pending = comm.all_gather_async(x, None)
        for _ in range(4):  # queued on the compute stream while the gather is in flight
            big = big @ big / 64
        pending.wait()
        torch.testing.assert_close(out, x)
        assert 0 in comm._comm_streams

        kernel = get_kernel("triton")
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3))
        decay = -torch.linspace(0.05, 0.5, 4, device="cuda")
        lay = SeqLayout("contiguous", 1)
        o, _ = sp_core(q, k, v, Job(AllGather(None, lay, None), lay, None, kernel, 0.125, True, decay))
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        o_ref = linear_attn(q, k, v, log_decay=decay, scale=0.125, kernel=kernel)
        grads_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v))
        for a, b in zip((o, *grads), (o_ref, *grads_ref)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.detach().abs().max()))
    finally:
        dist.destroy_process_group()


def test_lasp2_gathers_on_a_side_stream():
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.multiprocessing.spawn(_check, args=(os.path.join(d, "store"),), nprocs=1, join=True)
