"""`methods`: the four ways of combining the chunks' maps (lasp2, lasp1, allscan, logscan) measured against
the cost model, what `auto` picks, and the model carried to W = 8..256 on H100 NVLink and InfiniBand.

    python -m lasp.bench.sp methods [--world-sizes 2 4 8] [--tokens-per-rank 256] [--out results/sp_methods]

One torchrun launch of max(W) gloo processes (one thread each). For every W (sub-groups of the first W
ranks), every state size (small: H = 2, K = V = 32; large: H = 16, K = V = 128) and every method, one
Gated DeltaNet layer's forward and backward on each rank's shard is timed (median of --reps after a
warm-up, the slowest rank's), its messages counted (bytes received per rank), and priced by the cost
model (lasp.sp.cost) on the group's link, measured by the library's own `calibrate`: predicted = the
ranks' local compute measured concurrently (every rank runs the core's local work at once with a
combiner that sends nothing; for Ulysses, `linear_attn` on its shard) + the modelled messages and the
scans' products. `auto` is what `choose_linear` picks for the cell. Writes methods.jsonl,
a markdown table (methods.md) and two plots: measured against predicted, and the modelled winner by W on
the link presets (beside ZeCO's and LASP-2's published 256-GPU figures).
"""

import argparse
import dataclasses
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lasp.distributed.events import cpu_profile

METHODS = ("lasp2", "lasp1", "allscan", "logscan", "ulysses")
STATES = {"small": dict(H=2, K=32), "large": dict(H=16, K=128)}
# ZeCO (arXiv 2507.01004): 256 H100s, a 1B GLA model at 32K tokens per GPU
PUBLISHED_256 = {"ZeCO (All-Scan)": 40967, "LASP-2": 25402}


def _inputs(W: int, rank: int, T: int, H: int, K: int, layout: str):
    gen = torch.Generator().manual_seed(100 + rank)
    q, k, v = (torch.randn(1, T, H, K, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, T, H, generator=gen) * 0.9 + 0.05
    gate = -torch.rand(1, T, H, generator=gen) * 0.2
    do = torch.randn(1, T, H, K, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, beta, gate)], do


class _NoMessages:
    """A combiner that sends nothing (every incoming state 0): the core's local work alone."""

    in_band = False

    def scan(self, A, x, uniform, reverse):
        from lasp.sp.core import Later

        return Later(lambda: torch.zeros_like(x))

    def total(self, x):
        from lasp.sp.core import Later

        return Later(lambda: x)


def _slowest(x: float, group) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def measure_cell(group, W: int, rank: int, state: str, T: int, layout: str, reps: int) -> list[dict]:
    """Every method on one (W, state) cell: the slowest rank's median step, bytes, the prediction, auto."""
    from lasp import linear_attn, sp_linear_attn
    from lasp.bench.common import median_time
    from lasp.bench.sp.methods import messages
    from lasp.distributed.comm import p2p_log
    from lasp.kernels import DEFAULT_KERNEL
    from lasp.kernels.linear_attn.gated import as_vector_form
    from lasp.sp.core import Job, sp_core
    from lasp.sp.cost import Compute, Shape, choose_linear, layer_time, link_of
    from lasp.sp.layout import SeqLayout

    H, K = STATES[state]["H"], STATES[state]["K"]
    (q, k, v, beta, gate), do = _inputs(W, rank, T, H, K, layout)
    barrier = lambda: dist.barrier(group=group)  # noqa: E731

    def step(method):
        def run():
            if method == "compute":  # this rank's local work alone, every rank at once (no messages)
                o = linear_attn(q, k, v, beta=beta, gate=gate)
            elif method == "core":  # the core's local work (pairs, outputs, backward), no messages
                lay = SeqLayout(layout, W)
                job = Job(_NoMessages(), lay, group, DEFAULT_KERNEL, K**-0.5)
                o = sp_core(q, k, v, job, gate=as_vector_form(gate), beta=beta)[0]
            else:
                o = sp_linear_attn(
                    q, k, v, beta=beta, gate=gate, method=method, group=group, layout=layout, check_ranks=False
                )
            o.backward(do)

        return run

    compute = _slowest(median_time(step("compute"), reps, before=barrier), group)
    core = _slowest(median_time(step("core"), reps, before=barrier), group)
    link = link_of(group)
    auto = choose_linear(q, k, v, group=group, layout=layout, beta=beta, gate=gate)
    shape = Shape(W, 1, T, H, H, K, K, layout, 4, "gdn")
    rows = []
    for method in [m for m in METHODS if m != "ulysses" or H % W == 0]:  # Ulysses splits the heads
        took = _slowest(median_time(step(method), reps, before=barrier), group)
        with cpu_profile(record_shapes=True) as prof, p2p_log() as hops:
            step(method)()
        got = sum(m.nbytes for m in messages(prof, hops))
        most = torch.tensor([got], dtype=torch.float64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        model = layer_time("ulysses_linear" if method == "ulysses" else method, shape, Compute(0.0, 0.0), link)
        rows.append(
            {
                "W": W,
                "state": state,
                "H": H,
                "K": K,
                "V": K,
                "T": T,
                "layout": layout,
                "form": "gdn",
                "method": method,
                "step_s": took,
                "compute_s": compute if method == "ulysses" else core,
                "bytes_max_rank": int(most),
                "predicted_s": (compute if method == "ulysses" else core) + model["step"],
                "predicted_comm_s": model["step"],
                "auto": auto,
                "link": dataclasses.asdict(link),
            }
        )
    return rows


def run(args) -> None:
    """The body of the torchrun launch."""
    from lasp.bench.common import environment, write_jsonl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {W: dist.new_group(list(range(W))) for W in args.world_sizes}
    rows = []
    for W in args.world_sizes:
        for state in STATES:
            if rank < W:
                got = measure_cell(groups[W], W, rank, state, args.tokens_per_rank, args.layout, args.reps)
                if rank == 0:
                    rows += got
                    best = min(got, key=lambda r: r["step_s"])
                    print(
                        f"  W={W} {state:5s}: "
                        + "  ".join(f"{r['method']} {r['step_s'] * 1e3:.1f} ms" for r in got)
                        + f"  | auto -> {got[0]['auto']}, "
                        f"fastest {best['method']}",
                        flush=True,
                    )
            dist.barrier()
    if rank == 0:
        env = {**environment(), "launched_world_size": world, "cores": len(os.sched_getaffinity(0))}
        write_jsonl(Path(args.out) / "methods.jsonl", [{**r, **env} for r in rows])
    dist.destroy_process_group()


def extrapolate(world_sizes=(8, 16, 32, 64, 128, 256), T: int = 32768) -> list[dict]:
    """The model's per-layer communication (forward + backward) of each method at large W on the link
    presets: Gated DeltaNet, H = 16, K = V = 128, T tokens per GPU, bf16, zigzag."""
    from lasp.sp.cost import PRESETS, Compute, Shape, layer_time

    out = []
    for link in ("nvlink4-h100", "ib-ndr400"):
        for W in world_sizes:
            shape = Shape(W, 1, T, 16, 16, 128, 128, "zigzag", 2, "gdn")
            cost = {
                m: layer_time("ulysses_linear" if m == "ulysses" else m, shape, Compute(0.0, 0.0), PRESETS[link])[
                    "step"
                ]
                for m in METHODS
            }
            out.append(
                {
                    "link": link,
                    "W": W,
                    "T": T,
                    **{f"{m}_s": c for m, c in cost.items()},
                    "winner": min(cost, key=cost.get),
                    "modelled": True,
                }
            )
    return out


def report(rows: list[dict], extra: list[dict]) -> str:
    """The markdown table of the measured cells, the targets, and the extrapolation."""
    lines = [
        "| W | state | " + " | ".join(f"{m} ms (pred)" for m in METHODS) + " | bytes/rank (max) | auto | "
        "auto / fastest |",
        "|---|---|" + "---|" * (len(METHODS) + 3),
    ]
    errors, ratios = [], []
    cells = sorted({(r["W"], r["state"]) for r in rows}, key=lambda c: (c[0], c[1] != "small"))
    for W, state in cells:
        got = {r["method"]: r for r in rows if r["W"] == W and r["state"] == state}
        fastest = min(r["step_s"] for r in got.values())
        auto = next(iter(got.values()))["auto"]
        ratio = got[auto]["step_s"] / fastest
        ratios.append(ratio)
        errors += [abs(r["predicted_s"] - r["step_s"]) / r["step_s"] for r in got.values()]
        cols = " | ".join(
            f"{got[m]['step_s'] * 1e3:.1f} ({got[m]['predicted_s'] * 1e3:.1f})" if m in got else "-" for m in METHODS
        )
        sizes = ", ".join(f"{m} {got[m]['bytes_max_rank'] / 2**10:.0f}K" for m in METHODS if m in got)
        lines.append(f"| {W} | {state} | {cols} | {sizes} | {auto} | {ratio:.2f} |")
    lines.append("")
    lines.append(
        f"auto within 10% of the fastest method: {sum(x <= 1.10 for x in ratios)}/{len(ratios)} cells "
        f"(worst {max(ratios):.2f}x); the model's median |error| {100 * statistics.median(errors):.1f}% "
        f"(largest {100 * max(errors):.1f}%)"
    )
    lines += [
        "",
        "MODELLED communication per Gated DeltaNet layer (H = 16, K = V = 128, 32K tokens per GPU, bf16, "
        "forward + backward), us:",
        "",
        "| link | W | " + " | ".join(METHODS) + " | fewest |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for r in extra:
        lines.append(
            f"| {r['link']} | {r['W']} | "
            + " | ".join(f"{r[f'{m}_s'] * 1e6:.0f}" for m in METHODS)
            + f" | {r['winner']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], extra: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, marker in zip(METHODS, "osD^v"):
        pts = [r for r in rows if r["method"] == m]
        a.scatter([r["predicted_s"] * 1e3 for r in pts], [r["step_s"] * 1e3 for r in pts], marker=marker, label=m)
    lim = [min(r["step_s"] for r in rows) * 1e3 * 0.7, max(r["step_s"] for r in rows) * 1e3 * 1.4]
    a.plot(lim, lim, "k-", lw=0.6)
    a.set(
        xscale="log",
        yscale="log",
        xlabel="predicted ms (compute + modelled messages)",
        ylabel="measured ms",
        title="CPU, gloo: one Gated DeltaNet layer, W = 2, 4, 8",
    )
    a.legend(fontsize=8)
    for link, style in (("nvlink4-h100", "-"), ("ib-ndr400", "--")):
        pts = [r for r in extra if r["link"] == link]
        for m, color in zip(METHODS, ("C0", "C1", "C2", "C3", "C4")):
            b.plot(
                [r["W"] for r in pts],
                [r[f"{m}_s"] * 1e6 for r in pts],
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"{m}, {link}",
            )
    b.set(
        xscale="log",
        yscale="log",
        xlabel="W (GPUs)",
        ylabel="modelled messages per layer, us",
        title="MODELLED: GDN H=16 K=V=128, 32K tokens/GPU, bf16",
    )
    b.text(
        0.02,
        0.02,
        "published, 256 H100, 1B GLA, 32K/GPU (tokens/s/GPU):\n"
        + "\n".join(f"  {k}: {v:,}" for k, v in PUBLISHED_256.items()),
        transform=b.transAxes,
        fontsize=7,
    )
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from lasp.cli import at_least, processes, usage_error, writable

    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.sp methods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens-per-rank", type=int, default=256)
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=300, help="collective timeout, seconds")
    p.add_argument("--out", type=Path, default=Path("results/sp_methods"))
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plots from methods.jsonl")
    a = p.parse_args(argv)
    if "RANK" in os.environ:  # inside the launch
        return run(a)
    problems = at_least("--world-sizes", a.world_sizes, 2) + at_least("--tokens-per-rank", a.tokens_per_rank)
    problems += at_least("--reps", a.reps) + writable("--out", a.out, directory=True)
    if not a.report_only:
        problems += processes("--world-sizes", max(a.world_sizes, default=1))
    chunks = 2 if a.layout == "zigzag" else 1
    if a.tokens_per_rank >= 1 and a.tokens_per_rank % chunks:
        problems.append(
            f"--tokens-per-rank {a.tokens_per_rank} must split into the {a.layout} layout's {chunks} chunks"
        )
    usage_error(p, problems)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        W = max(a.world_sizes)
        print(
            f"methods: torchrun, {W} gloo processes; W = {a.world_sizes}, {a.tokens_per_rank} tokens per rank",
            flush=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={W}",
                "-m",
                "lasp.bench.sp.combine",
                *(sys.argv[1:] if argv is None else argv),
            ],
            check=True,
            env=env,
        )
    from lasp.bench.common import write_jsonl
    from lasp.bench.sp.model import read_jsonl

    rows = read_jsonl(a.out / "methods.jsonl")
    extra = extrapolate()
    write_jsonl(a.out / "extrapolated.jsonl", extra)
    text = report(rows, extra)
    (a.out / "methods.md").write_text(text + "\n")
    plot(rows, extra, a.out / "methods.png")
    print(text)
    print(f"wrote {a.out / 'methods.jsonl'}, {a.out / 'methods.md'}, {a.out / 'methods.png'}")


if __name__ == "__main__":
    main()
