"""GPU benchmark of the linear-attention kernels: this project's Triton kernels, flash-linear-attention's
chunk kernels for the same math, and the PyTorch path.

    python -m lasp.bench.kernels [--batch 1 4] [--lengths 2048 ... 131072] [--out results/kernels]

bf16, H=16, K=V=128, causal. Per (implementation, B, T): forward, backward and forward+backward time,
tokens/s and peak extra memory. Writes <out>.jsonl (with config, git revision, GPU, library versions)
and <out>.png (tokens/s against T). Needs a CUDA GPU. Peers, when flash-linear-attention is installed
(pip install flash-linear-attention): `chunk_simple_gla` with a constant per-head gate (the same math as
lasp with decay) and `chunk_linear_attn` (no decay).
"""

import argparse
import importlib.metadata
from pathlib import Path

import torch

from lasp.bench.common import environment, median_time, write_jsonl
from lasp.kernels import TorchChunkKernel, linear_attn

H, D = 16, 128


def _impls(log_decay):
    from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

    tri, ref = TritonChunkKernel(), TorchChunkKernel()
    impls = {
        "lasp-triton (decay)": lambda q, k, v: linear_attn(q, k, v, log_decay=log_decay, kernel=tri),
        "lasp-triton (no decay)": lambda q, k, v: linear_attn(q, k, v, kernel=tri),
        "lasp-torch (decay)": lambda q, k, v: linear_attn(q, k, v, log_decay=log_decay, kernel=ref),
    }
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla

        def gla(q, k, v):
            g = log_decay.to(q.dtype).expand(q.shape[0], q.shape[1], H)
            return chunk_simple_gla(q, k, v, g=g, scale=D**-0.5)[0]

        impls["fla chunk_simple_gla (decay)"] = gla
        impls["fla chunk_linear_attn (no decay)"] = lambda q, k, v: chunk_linear_attn(
            q, k, v, scale=D**-0.5, normalize=False
        )[0]
    except ImportError as e:
        print(f"flash-linear-attention not available ({e}); benchmarking lasp only")
    return impls


def _measure(fn, B, T, reps):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = {}
    out["fwd_s"] = median_time(lambda: fn(q, k, v), reps)
    o = fn(q, k, v)
    out["bwd_s"] = median_time(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), reps)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    out["fwd_bwd_s"] = median_time(step, reps)
    out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    out["tokens_per_s"] = B * T / out["fwd_bwd_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lasp.bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--torch-max", type=int, default=16384, help="longest T for the PyTorch path")
    p.add_argument("--out", type=Path, default=Path("results/kernels"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU (the CPU benchmark is python -m lasp.bench.cpu_linear_attn)")
    env = environment()
    versions = {}
    for pkg in ("triton", "flash-linear-attention", "fla-core"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    log_decay = -torch.linspace(0.01, 0.5, H, device="cuda")
    rows = []
    print(f"bf16, H={H}, K=V={D}, causal; {env['hardware'].get('gpu')}; {versions}")
    for name, fn in _impls(log_decay).items():
        for B in args.batch:
            for T in args.lengths:
                if "torch" in name and T > args.torch_max:
                    continue
                try:
                    r = _measure(fn, B, T, args.reps)
                except torch.cuda.OutOfMemoryError:
                    print(f"  {name:34s} B={B} T={T:6d}  out of memory")
                    torch.cuda.empty_cache()
                    continue
                rows.append({"impl": name, "B": B, "T": T, "H": H, "K": D, "V": D, "dtype": "bfloat16",
                             **r, "versions": versions, **env})
                print(f"  {name:34s} B={B} T={T:6d}  fwd {r['fwd_s'] * 1e3:8.2f} ms  bwd {r['bwd_s'] * 1e3:8.2f} ms"
                      f"  fwd+bwd {r['fwd_bwd_s'] * 1e3:8.2f} ms  {r['tokens_per_s'] / 1e6:7.2f} Mtok/s"
                      f"  +{r['peak_extra_bytes'] / 2**30:.2f} GiB", flush=True)
    write_jsonl(args.out.with_suffix(".jsonl"), rows)
    _plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.jsonl')} and {args.out.with_suffix('.png')}")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["impl"] == impl and r["B"] == B)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("tokens / s (forward + backward)")
        ax.set_title(f"B={B}, H={H}, K=V={D}, bf16")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
