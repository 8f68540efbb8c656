"""Demonstration: LASP-2 on W local processes reproduces single-process linear attention.

    python -m lasp.demo [--world-size 2] [--seq-len 4096] [--heads 4] [--head-dim 64]

Runs on CPU with gloo by default, on GPUs with NCCL when there is one GPU per process. For each layout it
prints the largest difference of the output and of the q, k, v gradients from the single-process result,
and the collectives counted by the torch profiler with the bytes each rank received.
"""

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasp import lasp2_linear_attn, linear_attn, shard_sequence
from lasp.cli import at_least, processes, sequence, usage_error
from lasp.distributed.events import cpu_profile, profiled_ops

_ELEM = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2}


def _comm(prof, world_size: int) -> list[str]:
    lines = []
    for e in profiled_ops(prof, "gloo:", "nccl:"):
        shape = e.input_shapes[0] if e.input_shapes else []
        numel = 1
        for s in shape:
            numel *= s
        lines.append(f"{e.name} of {shape} ({numel * world_size} elements received)")
    return lines


def _run(rank: int, args, store_path: str) -> None:
    use_cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=dist.FileStore(store_path, args.world_size),
        rank=rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    W, B, N, H, D = args.world_size, 1, args.seq_len, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, N, H, D, generator=gen).to(device) for _ in range(4))
    log_decay = -torch.linspace(0.01, 0.5, H).to(device)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = linear_attn(*full, log_decay=log_decay)
    o_ref.backward(do)
    for layout in ("contiguous", "zigzag"):
        shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
        local = [shard(x).requires_grad_() for x in (q, k, v)]
        with cpu_profile(record_shapes=True) as pf:
            o = lasp2_linear_attn(*local, layout=layout, log_decay=log_decay)
        with cpu_profile(record_shapes=True) as pb:
            o.backward(shard(do))
        diffs = torch.stack(
            [(o - shard(o_ref)).abs().max()] + [(x.grad - shard(r.grad)).abs().max() for x, r in zip(local, full)]
        )
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"\nlayout={layout}: {W} ranks x {N // W} tokens, H={H}, K=V={D}, decay on, {device.type}")
            print(
                "  max |difference| vs one process: "
                + ", ".join(f"{n} {d:.2e}" for n, d in zip(["o", "dq", "dk", "dv"], diffs.tolist()))
            )
            print("  forward communication (rank 0):  " + "; ".join(_comm(pf, W)))
            print("  backward communication (rank 0): " + "; ".join(_comm(pb, W)))
            tol = 1e-4 * max(o_ref.abs().max().item(), 1.0)
            print("  " + ("OK: exact to float32 rounding" if diffs.max().item() < tol else "MISMATCH"))
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--world-size", type=int, default=2, help="processes in the sequence-parallel group")
    p.add_argument("--seq-len", type=int, default=4096, help="global sequence length")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count()
    if args.device == "auto":
        args.device = "cuda" if args.world_size >= 1 and gpus >= args.world_size else "cpu"
    problems = processes("--world-size", args.world_size, gpus=args.device == "cuda")
    problems += at_least("--heads", args.heads) + at_least("--head-dim", args.head_dim)
    if args.world_size >= 1:  # zigzag: the finer of the two layouts
        problems += sequence("--seq-len", args.seq_len, "zigzag", args.world_size)
    usage_error(p, problems)
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.world_size)))
    print(f"LASP-2 demo: spawning {args.world_size} processes ({args.device})")
    with tempfile.TemporaryDirectory(prefix="lasp-demo-") as tmp:
        mp.spawn(_run, args=(args, os.path.join(tmp, "store")), nprocs=args.world_size)


if __name__ == "__main__":
    main()
