"""CPU benchmark: forward+backward of the chunked `linear_attn` against the quadratic masked form.

    python -m lasp.bench.cpu_linear_attn [--out results/cpu_linear_attn] [--lengths 1024 2048 4096 8192 16384]

fp32, B=1, H=4, K=V=64, causal with per-head decay. Writes <out>.jsonl and <out>.png and checks the two
targets of the LASP-2 core issue: chunked >= 8x faster than quadratic at T=4096, and T=16384 costing at
most 5.5x T=4096 (linear in T).
"""

import argparse
from pathlib import Path

import torch

from lasp.bench.common import environment, median_time, write_jsonl
from lasp.cli import at_least, usage_error, writable
from lasp.kernels import linear_attn, quadratic_linear_attn

B, H, D = 1, 4, 64


def _step(impl: str, T: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, D, generator=gen)
    log_decay = -torch.linspace(0.01, 0.5, H)

    def run():
        fn = linear_attn if impl == "chunked" else None
        o = fn(q, k, v, log_decay=log_decay) if fn else quadratic_linear_attn(q, k, v, log_decay)
        o.backward(do)
        q.grad = k.grad = v.grad = None

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.cpu_linear_attn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("results/cpu_linear_attn"))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--quadratic-max", type=int, default=4096, help="longest T for the quadratic baseline")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    problems = at_least("--lengths", args.lengths) + at_least("--quadratic-max", args.quadratic_max)
    problems += at_least("--reps", args.reps)
    problems += writable("--out", args.out.with_suffix(".jsonl")) or writable("--out", args.out.with_suffix(".png"))
    usage_error(p, problems)
    env = environment()
    print(
        f"linear_attn fwd+bwd, fp32, B={B} H={H} K=V={D}, decay; {env['hardware']['cpu']}, "
        f"{env['hardware']['threads']} threads"
    )
    rows = []
    for T in args.lengths:
        for impl in ("chunked", "quadratic"):
            if impl == "quadratic" and T > args.quadratic_max:
                continue
            sec = median_time(_step(impl, T), reps=args.reps if impl == "chunked" else max(2, args.reps // 2))
            rows.append(
                {
                    "impl": impl,
                    "T": T,
                    "B": B,
                    "H": H,
                    "K": D,
                    "V": D,
                    "dtype": "float32",
                    "decay": True,
                    "seconds": sec,
                    "tokens_per_s": B * T / sec,
                    **env,
                }
            )
            print(f"  {impl:9s} T={T:6d}  {sec * 1e3:9.1f} ms  {B * T / sec / 1e3:8.1f} ktok/s", flush=True)
    write_jsonl(args.out.with_suffix(".jsonl"), rows)
    _plot(rows, args.out.with_suffix(".png"))
    t = {(r["impl"], r["T"]): r["seconds"] for r in rows}
    if ("chunked", 4096) in t and ("quadratic", 4096) in t:
        speedup = t["quadratic", 4096] / t["chunked", 4096]
        print(f"speed-up over quadratic at T=4096: {speedup:.1f}x (target >= 8x): {'PASS' if speedup >= 8 else 'FAIL'}")
    if ("chunked", 4096) in t and ("chunked", 16384) in t:
        ratio = t["chunked", 16384] / t["chunked", 4096]
        print(f"cost T=16384 / T=4096: {ratio:.2f}x (target <= 5.5x): {'PASS' if ratio <= 5.5 else 'FAIL'}")
    print(f"wrote {args.out.with_suffix('.jsonl')} and {args.out.with_suffix('.png')}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in ("chunked", "quadratic"):
        pts = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["impl"] == impl)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("tokens / s (forward + backward)")
    ax.set_title(f"linear_attn on CPU, fp32, H={H}, K=V={D}, decay")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
