"""`sweep`: every method, W and N measured on real process groups (gloo on CPU, NCCL on GPUs).

One torchrun launch of W_max processes measures every W <= W_max on sub-groups of the first W ranks
(the others wait), so one command sweeps W. Each rank measures its own shard; rank 0 writes every rank's
rows, and the calibration of the interconnect: all-gathers, all-to-alls and point-to-point shifts of
several sizes on each sub-group, timed, for the cost model's fit.
"""

import datetime
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lasp.bench.common import environment, write_jsonl
from lasp.bench.sp.methods import Case, measure
from lasp.distributed.events import cpu_profile
from lasp.sp.layout import SeqLayout

CALIBRATION_BYTES = (4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20)


def cases(methods: list[str], world_sizes: list[int], seq_lens: list[int], per_rank: list[int], **shape) -> list[Case]:
    """Strong scaling (each N in seq_lens at every W) and weak scaling (N = t * W for t in per_rank)."""
    out = []
    for W in world_sizes:
        for N in sorted(set(seq_lens) | {t * W for t in per_rank}):
            out += [Case(m, W, N, **shape) for m in methods]
    return out


def _calibrate(group, W: int, device: torch.device, reps: int) -> list[dict]:
    from lasp.distributed import all_to_all_stack, ring_shift
    from lasp.distributed.comm import all_gather_async

    rows = []
    for nbytes in CALIBRATION_BYTES:
        per_rank = max(nbytes // W // 4, 1)
        x = torch.zeros(per_rank, device=device)
        ops = {
            "all_gather": (lambda: all_gather_async(x, group)[1].wait(), W * per_rank * 4),
            "all_to_all": (lambda: all_to_all_stack(torch.zeros(W, per_rank, device=device), group), W * per_rank * 4),
            "p2p": (lambda: ring_shift(torch.zeros(W * per_rank, device=device), group), W * per_rank * 4),
        }
        for kind, (fn, size) in ops.items():
            fn()
            times = []
            for _ in range(reps):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append({"kind": kind, "W": W, "nbytes": size, "seconds": statistics.median(times)})
    return rows


def _hybrid_steps(args, rank: int, world: int) -> list[dict]:
    """A whole hybrid Linear-Llama training step (forward, backward, gradient sync: `lasp.parallel.train_step`)
    at SP = W and DP = world / W, for every W that divides the launch; tokens/s counts every replica."""
    from lasp.bench.sp.methods import messages
    from lasp.distributed.comm import p2p_log
    from lasp.model import LinearLlama, ModelConfig
    from lasp.parallel import ParallelConfig, init_groups, parallelize, train_step

    hidden = 16 * args.heads
    cfg = ModelConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_layers=4,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        ffn_hidden_size=4 * hidden,
        layer_pattern="LLLS",
    )
    rows = []
    for W in sorted(w for w in set(args.world_sizes) if world % w == 0):
        pcfg = ParallelConfig(sp=W, dp=world // W, sp_layout=args.layout)
        groups = init_groups(pcfg, args.timeout)
        torch.manual_seed(0)
        stage = parallelize(LinearLlama(cfg), pcfg, groups)
        for N in sorted(set(args.seq_lens)):
            if N % SeqLayout(args.layout, W).num_chunks:
                continue
            tokens = torch.randint(0, cfg.vocab_size, (pcfg.dp, N + 1), generator=torch.Generator().manual_seed(N))
            train_step(stage, tokens, pcfg, groups)
            times = []
            for _ in range(args.reps):
                dist.barrier()
                t0 = time.perf_counter()
                train_step(stage, tokens, pcfg, groups)
                times.append(time.perf_counter() - t0)
            with cpu_profile(record_shapes=True) as prof, p2p_log() as hops:
                train_step(stage, tokens, pcfg, groups)
            step = statistics.median(times)
            rows.append(
                {
                    "method": "hybrid_train_step",
                    "W": W,
                    "N": N,
                    "B": pcfg.dp,
                    "H": args.heads,
                    "Hkv": args.kv_heads,
                    "D": 16,
                    "layout": args.layout,
                    "dtype": "float32",
                    "rank": rank,
                    "dp": pcfg.dp,
                    "reps": args.reps,
                    "step_s": step,
                    "tokens_per_s": pcfg.dp * N / step,
                    "fwd_messages": [m.__dict__ for m in messages(prof, hops)],
                    "bwd_messages": [],
                    "model": "Linear-Llama LLLS, 4 layers, hidden %d, vocab 256" % hidden,
                }
            )
            if rank == 0:
                print(f"  hybrid train step  sp={W} dp={pcfg.dp} N={N:7d}  {step * 1e3:9.1f} ms/step", flush=True)
    return rows


def run(args) -> None:
    """The body of `python -m lasp.bench.sp sweep` on one rank of a torchrun launch."""
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    todo = cases(
        args.methods,
        [w for w in args.world_sizes if w <= world],
        args.seq_lens,
        args.tokens_per_rank,
        B=args.batch,
        H=args.heads,
        Hkv=args.kv_heads,
        D=args.head_dim,
        layout=args.layout,
        dtype=args.dtype,
    )
    rows, calibration = [], []
    groups = {W: dist.new_group(list(range(W))) for W in sorted({c.W for c in todo})}  # every rank makes each
    for i, case in enumerate(todo):
        group = groups[case.W]
        if rank < case.W:
            why = case.unsupported()
            if why:
                row = {**case.__dict__, "rank": rank, "skipped": why}
            else:
                try:
                    row = measure(
                        case,
                        group,
                        rank,
                        args.reps,
                        check_ranks=not args.no_check_ranks,
                        barrier=lambda g=group: dist.barrier(group=g),
                    )
                except torch.OutOfMemoryError as e:  # the other ranks run out too: same shapes
                    row = {**case.__dict__, "rank": rank, "skipped": f"out of memory: {str(e).splitlines()[0]}"}
            rows.append(row)
            if rank == 0:
                took = "skipped: " + row["skipped"] if "skipped" in row else f"{row['step_s'] * 1e3:9.1f} ms/step"
                print(f"  [{i + 1}/{len(todo)}] {case.method:14s} W={case.W} N={case.N:7d}  {took}", flush=True)
        dist.barrier()
    for W, group in groups.items():
        if W > 1 and rank < W:
            got = _calibrate(group, W, device, args.reps)
            calibration += got if rank == 0 else []
        dist.barrier()
    if args.train_step:
        rows += _hybrid_steps(args, rank, world)
    everything = [None] * world
    dist.all_gather_object(everything, rows)
    if rank == 0:
        env = {
            **environment(),
            "backend": dist.get_backend(),
            "launched_world_size": world,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        }
        out = Path(args.out)
        write_jsonl(out / "measured.jsonl", [{**r, **env} for per in everything for r in per])
        write_jsonl(out / "calibration.jsonl", [{**r, **env} for r in calibration])
        print(f"wrote {out / 'measured.jsonl'} and {out / 'calibration.jsonl'}", flush=True)
    dist.destroy_process_group()
