"""GPU benchmark of the linear-attention kernels: this project's Triton kernels, flash-linear-attention's
chunk kernels for the same math, and the PyTorch path.

    python -m lasp.bench.kernels [--batch 1 4] [--lengths 2048 ... 131072] [--out results/kernels]

bf16, H=16, K=V=128, causal. Per (implementation, B, T): forward, backward and forward+backward time,
tokens/s and peak extra memory. Writes <out>.jsonl row by row (with config, git revision, GPU, library
versions), <out>.png (tokens/s against T) and prints the issue's targets: the forward+backward ratio of
lasp-triton to the fastest flash-linear-attention kernel for the same math, and how flat lasp-triton's
time per token is from 8K to 128K. Needs a CUDA GPU (`--device cpu` only checks this script, at toy
sizes, with TRITON_INTERPRET=1).

Peers, when flash-linear-attention is installed (pip install fla-core): `chunk_simple_gla` with a
constant per-head decay, given as `g_gamma` [H] and as a gate `g` [B, T, H] (the same math as lasp with
decay), and `chunk_linear_attn` (no decay). Before timing, each implementation's output and gradients
are compared with the fp32 PyTorch path on the same inputs (max_rel_err_vs_fp32); one that cannot run
here is recorded with its error and skipped.
"""

import argparse
import importlib.metadata
import json
from pathlib import Path

import torch

from lasp.bench.common import environment, median_time
from lasp.cli import at_least, existing, usage_error, writable
from lasp.kernels import TorchChunkKernel, linear_attn


def _impls(log_decay, H, D):
    """name -> (fn(q, k, v) -> o, has decay)."""
    from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

    tri, ref = TritonChunkKernel(), TorchChunkKernel()
    impls = {
        "lasp-triton (decay)": (lambda q, k, v: linear_attn(q, k, v, log_decay=log_decay, kernel=tri), True),
        "lasp-triton (no decay)": (lambda q, k, v: linear_attn(q, k, v, kernel=tri), False),
        "lasp-torch (decay)": (lambda q, k, v: linear_attn(q, k, v, log_decay=log_decay, kernel=ref), True),
    }
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        print(f"flash-linear-attention not available ({e}); benchmarking lasp only")
        return impls

    def gla_gamma(q, k, v):
        return chunk_simple_gla(q, k, v, g_gamma=log_decay, scale=D**-0.5)[0]

    def gla_gate(q, k, v):
        g = log_decay.to(q.dtype).expand(q.shape[0], q.shape[1], H)
        return chunk_simple_gla(q, k, v, g=g, scale=D**-0.5)[0]

    impls["fla chunk_simple_gla g_gamma (decay)"] = (gla_gamma, True)
    impls["fla chunk_simple_gla g (decay)"] = (gla_gate, True)
    impls["fla chunk_linear_attn (no decay)"] = (
        lambda q, k, v: chunk_linear_attn(q, k, v, scale=D**-0.5, normalize=False)[0],
        False,
    )
    return impls


def _inputs(B, T, H, D, dtype, device, seed, n=4):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen) for _ in range(n)]


def agreement(fn, has_decay, log_decay, T, H, D, dtype, device) -> float:
    """Largest |x - x_ref| / max|x_ref| over o, dq, dk, dv against the fp32 PyTorch path on the same
    inputs: every implementation must compute the same math before its time means anything."""
    x = _inputs(1, T, H, D, dtype, device, seed=1)
    got = [t.clone().requires_grad_() for t in x[:3]]
    want = [t.float().requires_grad_() for t in x[:3]]
    o = fn(*got)
    o_ref = linear_attn(*want, log_decay=log_decay if has_decay else None, kernel=TorchChunkKernel())
    pairs = zip([o, *torch.autograd.grad(o, got, x[3])], [o_ref, *torch.autograd.grad(o_ref, want, x[3].float())])
    return max(float((a.detach().float() - b.detach()).abs().max() / b.detach().abs().max()) for a, b in pairs)


def measure(fn, B, T, H, D, dtype, device, reps) -> dict:
    q, k, v, do = _inputs(B, T, H, D, dtype, device, seed=0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = {"fwd_s": median_time(lambda: fn(q, k, v), reps)}
    o = fn(q, k, v)
    out["bwd_s"] = median_time(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), reps)
    o = None  # free the graph before the peak is measured
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out["fwd_bwd_s"] = median_time(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), reps)
    out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base if cuda else None
    out["tokens_per_s"] = B * T / out["fwd_bwd_s"]
    return out


def summary(rows: list[dict], ours: str = "lasp-triton (decay)", lo: int = 8192, hi: int = 131072) -> list[str]:
    """The issue's targets, as lines: per (B, T) the fwd+bwd ratio of `ours` to the fastest fla kernel for
    the same math (> 1: ours is faster) and its activation memory against that kernel's; per B the spread
    of ours's time per token over lo..hi."""
    timed = [r for r in rows if "fwd_bwd_s" in r]
    decay = {r["impl"] for r in timed if r["impl"].startswith("fla") and "(decay)" in r["impl"]}
    lines = []
    for B in sorted({r["B"] for r in timed}):
        mine = {r["T"]: r for r in timed if r["impl"] == ours and r["B"] == B}
        for T in sorted(mine):
            peers = [r for r in timed if r["impl"] in decay and r["B"] == B and r["T"] == T]
            if not peers:
                continue
            best = min(peers, key=lambda r: r["fwd_bwd_s"])
            mem = ""
            if mine[T]["peak_extra_bytes"] is not None and best["peak_extra_bytes"]:
                mem = f", memory {mine[T]['peak_extra_bytes'] / best['peak_extra_bytes']:.2f}x"
            lines.append(
                f"B={B} T={T:6d}: {ours} {mine[T]['fwd_bwd_s'] * 1e3:8.2f} ms, {best['impl']} "
                f"{best['fwd_bwd_s'] * 1e3:8.2f} ms, speed ratio {best['fwd_bwd_s'] / mine[T]['fwd_bwd_s']:.2f}{mem}"
            )
        per_token = [mine[T]["fwd_bwd_s"] / (B * T) for T in mine if lo <= T <= hi]
        if len(per_token) > 1:
            lines.append(
                f"B={B}: {ours} time per token over T={lo}..{hi} varies by "
                f"{max(per_token) / min(per_token) - 1:.1%} (max/min - 1)"
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--torch-max", type=int, default=16384, help="longest T for the PyTorch path")
    p.add_argument("--check-len", type=int, default=2048, help="T of the agreement check")
    p.add_argument("--only", nargs="+", default=None, help="implementations whose name starts with one of these")
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu only checks this script at toy sizes (float32, Triton in its interpreter)",
    )
    p.add_argument("--out", type=Path, default=Path("results/kernels"))
    p.add_argument(
        "--from-jsonl",
        type=Path,
        nargs="+",
        default=None,
        help="measure nothing: merge these files (e.g. one per call of a time-limited machine) into "
        "<out>.jsonl, print the summary and plot",
    )
    args = p.parse_args(argv)
    unwritable = writable("--out", args.out.with_suffix(".jsonl")) or writable("--out", args.out.with_suffix(".png"))
    if args.from_jsonl:
        usage_error(p, [q for path in args.from_jsonl for q in existing("--from-jsonl", path)] + unwritable)
        return _merge(args.from_jsonl, args.out)
    problems = []
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("this benchmark needs a CUDA GPU (the CPU benchmark is python -m lasp.bench.cpu_linear_attn)")
    for option in ("batch", "lengths", "heads", "head_dim", "reps", "torch_max", "check_len"):
        problems += at_least(f"--{option.replace('_', '-')}", getattr(args, option))
    usage_error(p, problems + unwritable)
    H, D, device = args.heads, args.head_dim, args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    env = environment()
    versions = {}
    for pkg in ("triton", "flash-linear-attention", "fla-core"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    log_decay = -torch.linspace(0.01, 0.5, H, device=device)
    config = {"H": H, "K": D, "V": D, "dtype": str(dtype).removeprefix("torch."), "versions": versions, **env}
    print(f"{config['dtype']}, H={H}, K=V={D}, causal; {env['hardware'].get('gpu', device)}; {versions}", flush=True)
    jsonl = args.out.with_suffix(".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with jsonl.open("w") as f:

        def record(row):
            rows.append(row)
            f.write(json.dumps({**row, **config}) + "\n")
            f.flush()  # rows so far survive a crash or a timeout

        for name, (fn, has_decay) in _impls(log_decay, H, D).items():
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            try:
                err = agreement(fn, has_decay, log_decay, args.check_len, H, D, dtype, device)
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                print(f"  {name:38s} cannot run: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                record({"impl": name, "error": f"{type(e).__name__}: {e}"})
                continue
            print(f"  {name:38s} agrees with the fp32 PyTorch path to {err:.1e} (relative, T={args.check_len})")
            for B in args.batch:
                for T in args.lengths:
                    if "torch" in name and T > args.torch_max:
                        continue
                    try:
                        r = measure(fn, B, T, H, D, dtype, device, args.reps)
                    except torch.cuda.OutOfMemoryError:
                        print(f"  {name:38s} B={B} T={T:6d}  out of memory", flush=True)
                        torch.cuda.empty_cache()
                        record({"impl": name, "B": B, "T": T, "error": "out of memory"})
                        continue
                    record({"impl": name, "B": B, "T": T, "max_rel_err_vs_fp32": err, **r})
                    mem = "" if r["peak_extra_bytes"] is None else f"  +{r['peak_extra_bytes'] / 2**30:.2f} GiB"
                    print(
                        f"  {name:38s} B={B} T={T:6d}  fwd {r['fwd_s'] * 1e3:8.2f} ms  bwd {r['bwd_s'] * 1e3:8.2f} ms"
                        f"  fwd+bwd {r['fwd_bwd_s'] * 1e3:8.2f} ms  {r['tokens_per_s'] / 1e6:7.2f} Mtok/s{mem}",
                        flush=True,
                    )
    for line in summary(rows):
        print(line)
    _plot([r for r in rows if "fwd_bwd_s" in r], args.out.with_suffix(".png"), H, D, config["dtype"])
    print(f"wrote {jsonl} and {args.out.with_suffix('.png')}")


def _merge(paths: list[Path], out: Path) -> None:
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"no rows in {', '.join(map(str, paths))}")
    shapes = {(r["H"], r["K"], r["dtype"]) for r in rows}
    if len(shapes) > 1:
        raise SystemExit(f"the files mix configurations (H, K, dtype) {sorted(shapes)}; merge like with like")
    out.with_suffix(".jsonl").parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for line in summary(rows):
        print(line)
    H, D, dtype = shapes.pop()
    _plot([r for r in rows if "fwd_bwd_s" in r], out.with_suffix(".png"), H, D, dtype)
    print(f"merged {len(rows)} rows into {out.with_suffix('.jsonl')} and {out.with_suffix('.png')}")


def _plot(rows, path: Path, H, D, dtype) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["B"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["T"], r["tokens_per_s"]) for r in rows if r["impl"] == impl and r["B"] == B)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("tokens / s (forward + backward)")
        ax.set_title(f"B={B}, H={H}, K=V={D}, {dtype}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
