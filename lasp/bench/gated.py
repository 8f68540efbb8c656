"""CPU benchmark: what a data-dependent gate and the delta rule cost in `linear_attn`, forward + backward.

    python -m lasp.bench.gated [--out results/gated] [--lengths 1024 4096] [--reps 5]

fp32, B=1, H=4, K=V=64 (as `lasp.bench.cpu_linear_attn`): the constant per-head decay, the scalar gate
[B, T, H] and the vector gate [B, T, H, K], every gradient (the gate's included), the constant decay and
the scalar gate over packed documents of DOC_LEN tokens (`cu_seqlens`), and the delta rule's three forms
(DeltaNet, Gated DeltaNet, KDA; beta's gradient included), Gated DeltaProduct (2 steps per token) and
Mixture-of-Memories over Gated DeltaNet (4 memories, top 2, and a shared one: 5 memory heads per head, past
the layer's projections). Writes <out>.jsonl with the time and peak
memory of each, and prints against the targets: the scalar gate <= 1.3x the constant decay, the vector
gate <= 2x; Gated DeltaNet <= 3x the scalar gate in time and <= 2x in peak memory. Last, LASP-2's
gathered bytes per layer for Gated DeltaNet at W = 8..128 (two chunks per rank, zigzag): the pair this
code builds for a chunk, times the chunks, beside the cost model's (lasp.sp.cost) prediction.
"""

import argparse
from pathlib import Path

import torch

from lasp.bench.common import environment, median_time, write_jsonl
from lasp.bench.loss_memory import peak_cpu_memory
from lasp.cli import at_least, usage_error, writable
from lasp.kernels import linear_attn

B, H, D = 1, 4, 64
DELTA = {"deltanet": None, "gdn": "scalar", "kda": "vector", "deltaproduct": "scalar", "mom": "scalar"}
"""The delta rule's forms and their gates. deltaproduct: Gated DeltaProduct, HOUSEHOLDER steps per token;
mom: Mixture-of-Memories over Gated DeltaNet, MEMORIES memories per head (top TOP_K) plus a shared one."""
FORMS = ("decay", "scalar", "vector", "decay-docs", "scalar-docs", *DELTA)
HOUSEHOLDER, MEMORIES, TOP_K = 2, 4, 2
DOC_LEN = 300  # tokens per packed document: starts fall anywhere in the 64-token blocks
TARGETS = {("scalar", "decay"): 1.3, ("vector", "decay"): 2.0, ("gdn", "scalar"): 3.0}  # time over time
MEMORY_TARGETS = {("gdn", "scalar"): 2.0}  # peak memory over peak memory
WORLD_SIZES = (8, 16, 32, 64, 128)


def _step(form: str, T: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, D, generator=gen)
    if form.startswith("decay"):
        kw = {"log_decay": -torch.linspace(0.01, 0.5, H)}
    elif form in DELTA:
        rows, heads = (HOUSEHOLDER, 1) if form == "deltaproduct" else (1, MEMORIES + 1) if form == "mom" else (1, 1)
        if rows * heads > 1:  # keys and values per step or memory head, as the layers give them
            k, v = (torch.randn(B, T * rows, H * heads, D, generator=gen).requires_grad_() for _ in range(2))
        k.data = torch.nn.functional.normalize(k.data, dim=-1)  # as the layer gives it
        kw = {"beta": torch.rand(B, T * rows, H * heads, generator=gen).add_(0.1).requires_grad_()}
        if DELTA[form] is not None:
            shape = (B, T, H * heads, D) if DELTA[form] == "vector" else (B, T, H * heads)
            kw["gate"] = (-torch.rand(*shape, generator=gen) * 0.2).requires_grad_()
        if form == "deltaproduct":
            kw["householder"] = HOUSEHOLDER
        if form == "mom":
            return _mom_step(q, k, v, do, kw, gen)
    else:
        shape = (B, T, H, D) if form == "vector" else (B, T, H)
        kw = {"gate": (-torch.rand(*shape, generator=gen) * 0.2).requires_grad_()}
    if form.endswith("-docs"):
        kw["cu_seqlens"] = list(range(0, T, min(DOC_LEN, max(T // 3, 1))))  # at least 3 documents

    def run():
        linear_attn(q, k, v, **kw).backward(do)
        q.grad = k.grad = v.grad = None
        for name in ("gate", "beta"):
            if name in kw:
                kw[name].grad = None

    return run


def _mom_step(q, k, v, do, kw, gen):
    """MoM's layer math past its projections: random top-k routing, the memories as heads (lasp.model.mom)."""
    from lasp.model.mom import Router, run_memories

    torch.manual_seed(0)
    router = Router(D, MEMORIES, TOP_K, shared=True)  # the layer's router, on random tokens: routes that vary
    with torch.no_grad():
        route = router(torch.randn(*q.shape[:2], D, generator=gen))

    def run():
        run_memories(linear_attn, q, k, v, kw["gate"], route, beta=kw["beta"]).backward(do)
        q.grad = k.grad = v.grad = kw["gate"].grad = kw["beta"].grad = None

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.gated", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("results/gated"))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    usage_error(
        p,
        at_least("--lengths", a.lengths) + at_least("--reps", a.reps) + writable("--out", a.out.with_suffix(".jsonl")),
    )
    env = environment()
    print(
        f"linear_attn fwd+bwd, fp32, B={B} H={H} K=V={D}; {env['hardware']['cpu']}, "
        f"{env['hardware']['threads']} threads",
        flush=True,
    )
    rows, t, mem = [], {}, {}
    for T in a.lengths:
        for form in FORMS:
            step = _step(form, T)
            sec = median_time(step, reps=a.reps)
            t[form, T], mem[form, T] = sec, peak_cpu_memory(step)
            rows.append(
                {
                    "form": form,
                    "T": T,
                    "B": B,
                    "H": H,
                    "K": D,
                    "V": D,
                    "dtype": "float32",
                    "seconds": sec,
                    "tokens_per_s": B * T / sec,
                    "over_decay": sec / t["decay", T],
                    "peak_bytes": mem[form, T],
                    **env,
                }
            )
            print(
                f"  {form:12s} T={T:6d}  {sec * 1e3:8.1f} ms  {sec / t['decay', T]:5.2f}x the constant decay  "
                f"peak {mem[form, T] / 2**20:7.1f} MiB",
                flush=True,
            )
    T = 4096 if 4096 in a.lengths else max(a.lengths)
    for (form, base), target in TARGETS.items():
        ratio = t[form, T] / t[base, T]
        print(
            f"{form} at T={T}: {ratio:.2f}x the time of {base} (target <= {target}x): "
            f"{'PASS' if ratio <= target else 'FAIL'}"
        )
    for (form, base), target in MEMORY_TARGETS.items():
        ratio = mem[form, T] / mem[base, T]
        print(
            f"{form} at T={T}: {ratio:.2f}x the peak memory of {base} (target <= {target}x): "
            f"{'PASS' if ratio <= target else 'FAIL'}"
        )
    rows += gathered_bytes()
    write_jsonl(a.out.with_suffix(".jsonl"), rows)
    print(f"wrote {a.out.with_suffix('.jsonl')}")


def gathered_bytes(form: str = "gdn", T: int = 4096, world_sizes=WORLD_SIZES) -> list[dict]:
    """LASP-2's forward all-gather per layer, fp32, B=1, H=4, K=V=64, zigzag (2 chunks per rank): the pair
    (A, M) this code builds for one chunk (the kernel's delta_transitions, as lasp.sp.lasp2 sends it), times
    the 2W chunks, against the cost model's plan; the bytes do not depend on T."""
    from lasp.kernels import DEFAULT_KERNEL
    from lasp.kernels.linear_attn.gated import as_vector_form
    from lasp.sp.cost import Shape, plan

    gen = torch.Generator().manual_seed(0)
    L = 64  # a chunk's length does not change its pair
    q, k, v = (torch.randn(B, L, H, D, generator=gen) for _ in range(3))
    gate = None if DELTA[form] is None else -torch.rand(B, L, H, *([D] if DELTA[form] == "vector" else []))
    beta = torch.rand(B, L, H, generator=gen)
    A, M, _ = DEFAULT_KERNEL.delta_transitions(q, k, v, beta, None if gate is None else as_vector_form(gate), D**-0.5)
    pair = torch.cat([A, M], dim=-1).nbytes
    rows = []
    print(f"LASP-2 all-gather per layer, {form}, fp32, B={B} H={H} K=V={D}, zigzag (bytes do not depend on T):")
    for W in world_sizes:
        built = 2 * W * pair
        model = plan("lasp2", Shape(W, B, T // W, H, H, D, D, "zigzag", 4, form=form)).fwd[0].nbytes
        rows.append({"kind": "gathered_bytes", "form": form, "W": W, "bytes_built": built, "bytes_model": model})
        print(
            f"  W={W:4d}  {built / 2**20:8.2f} MiB built  {model / 2**20:8.2f} MiB cost model"
            f"{'' if built == model else '  MISMATCH'}"
        )
    return rows


if __name__ == "__main__":
    main()
