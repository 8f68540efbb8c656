"""Communication of every SP algorithm, counted by the torch profiler on W local gloo processes.

    python -m lasp.bench.comm_table [--world-size 4] [--seq-len 4096] [--out results/comm_table]

Runs one forward and one backward of each algorithm on the same split (B=1, H=8 query heads, 2 KV heads,
head dim 64; zigzag, causal) and records the torch.distributed operations each rank asked for. The ops run
with check_ranks=False: the table is the algorithms' own traffic (the rank checks add a 512-byte header to
the all-gathers of LASP-2 and LASP-2H, and one 512-byte all-gather per call to LASP-1, Ring and Ulysses;
see lasp.distributed.agree and docs/api.md). Writes
<out>.jsonl and prints a markdown table. Nothing in the table is typed in by hand.
"""

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasp.bench.common import environment, write_jsonl
from lasp.cli import processes, sequence, usage_error, writable
from lasp.distributed.events import cpu_profile, profiled_ops

B, H, HKV, D = 1, 8, 2, 64
ALGOS = ["lasp2", "lasp1", "ulysses_linear", "lasp2h", "ring", "ulysses_softmax"]
CHAIN = {"lasp1"}  # point-to-point hops that wait on each other: steps = messages in total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _received(prof, W: int) -> list[tuple[str, int]]:
    """(operation, elements this rank received) for every communication op the profiler saw."""
    out = []
    for e in profiled_ops(prof):
        shapes = e.input_shapes
        if e.name == "c10d::_allgather_base_":
            out.append(("all-gather", _numel(shapes[0]) * (W - 1) // W))
        elif e.name == "c10d::_reduce_scatter_base_":
            out.append(("reduce-scatter", _numel(shapes[1]) * (W - 1) // W))
        elif e.name == "c10d::alltoall_base_":
            out.append(("all-to-all", _numel(shapes[1]) * (W - 1) // W))
        elif e.name == "gloo:recv":
            out.append(("recv", _numel(shapes[0])))
    return out


def _run(rank: int, W: int, N: int, store: str, result_path: str) -> None:
    import lasp

    dist.init_process_group(
        "gloo", store=dist.FileStore(store, W), rank=rank, world_size=W, timeout=datetime.timedelta(seconds=120)
    )
    gen = torch.Generator().manual_seed(0)
    full = {n: torch.randn(B, N, h, D, generator=gen) for n, h in (("q", H), ("k", HKV), ("v", HKV), ("do", H))}
    local = {n: lasp.shard_sequence(x, rank=rank, world_size=W, layout="zigzag") for n, x in full.items()}
    decay = -torch.linspace(0.01, 0.5, H)
    ops = {
        "lasp2": lambda q, k, v: lasp.lasp2_linear_attn(q, k, v, layout="zigzag", log_decay=decay, check_ranks=False),
        "lasp1": lambda q, k, v: lasp.lasp1_linear_attn(q, k, v, layout="zigzag", log_decay=decay, check_ranks=False),
        "ulysses_linear": lambda q, k, v: lasp.ulysses_linear_attn(
            q, k, v, layout="zigzag", log_decay=decay, check_ranks=False
        ),
        "lasp2h": lambda q, k, v: lasp.lasp2h_softmax_attn(q, k, v, layout="zigzag", check_ranks=False),
        "ring": lambda q, k, v: lasp.ring_softmax_attn(q, k, v, layout="zigzag", check_ranks=False),
        "ulysses_softmax": lambda q, k, v: lasp.ulysses_softmax_attn(q, k, v, layout="zigzag", check_ranks=False),
    }
    rows = []
    for algo in ALGOS:
        q, k, v = (local[n].clone().requires_grad_() for n in "qkv")
        with cpu_profile(record_shapes=True) as pf:
            o = ops[algo](q, k, v)
        with cpu_profile(record_shapes=True) as pb:
            o.backward(local["do"])
        rows.append({"algo": algo, "rank": rank, "fwd": _received(pf, W), "bwd": _received(pb, W)})
    gathered = [None] * W
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(result_path).write_text(json.dumps([r for per_rank in gathered for r in per_rank]))
    dist.destroy_process_group()


def summarise(rows: list[dict], W: int) -> list[dict]:
    """Per algorithm: ops and elements per rank (the busiest rank), sequential steps, largest buffer."""
    out = []
    for algo in ALGOS:
        mine = [r for r in rows if r["algo"] == algo]
        summary = {"algo": algo, "world_size": W}
        for phase in ("fwd", "bwd"):
            per_rank = [r[phase] for r in mine]
            kinds = sorted({k for ops in per_rank for k, _ in ops})
            busiest = max(per_rank, key=lambda ops: sum(n for _, n in ops))
            if algo in CHAIN:
                steps = sum(1 for ops in per_rank for k, _ in ops if k == "recv")
            else:
                steps = max(len(ops) for ops in per_rank)
            summary[phase] = {
                "ops": ", ".join(f"{sum(1 for k2, _ in busiest if k2 == k)}x {k}" for k in kinds) or "-",
                "elements_received": sum(n for _, n in busiest),
                "sequential_steps": steps,
                "largest_message": max((n for ops in per_rank for _, n in ops), default=0),
            }
        out.append(summary)
    return out


def markdown(summary: list[dict], N: int) -> str:
    lines = [
        "| algorithm | forward ops (per rank) | backward ops (per rank) | elements received per rank, fwd + bwd "
        "| sequential steps fwd / bwd | largest message (elements) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        f, b = s["fwd"], s["bwd"]
        lines.append(
            f"| {s['algo']} | {f['ops']} | {b['ops']} | {f['elements_received'] + b['elements_received']:,} "
            f"| {f['sequential_steps']} / {b['sequential_steps']} "
            f"| {max(f['largest_message'], b['largest_message']):,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.comm_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("results/comm_table"))
    args = p.parse_args(argv)
    W, N = args.world_size, args.seq_len
    problems = processes("--world-size", W, low=2)
    if W >= 2:
        problems += sequence("--seq-len", N, "zigzag", W)
        if H % W:
            problems.append(f"--world-size {W}: Ulysses needs the {H} heads divisible by the world size")
    usage_error(p, problems + writable("--out", args.out.with_suffix(".jsonl")))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"counting communication: W={W}, N={N}, B={B}, H={H}, Hkv={HKV}, D={D}, zigzag, causal", flush=True)
    with tempfile.TemporaryDirectory(prefix="lasp-comm-") as tmp:
        result = os.path.join(tmp, "rows.json")
        mp.spawn(_run, args=(W, N, os.path.join(tmp, "store"), result), nprocs=W)
        rows = json.loads(Path(result).read_text())
    summary = summarise(rows, W)
    env = environment()
    write_jsonl(
        args.out.with_suffix(".jsonl"),
        [{**s, "seq_len": N, "B": B, "H": H, "Hkv": HKV, "D": D, **env} for s in summary],
    )
    print(markdown(summary, N))
    print(f"wrote {args.out.with_suffix('.jsonl')}")


if __name__ == "__main__":
    main()
