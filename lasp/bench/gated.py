"""CPU benchmark: what a data-dependent gate costs in `linear_attn`, forward + backward.

    python -m lasp.bench.gated [--out results/gated] [--lengths 1024 4096] [--reps 5]

fp32, B=1, H=4, K=V=64 (as `lasp.bench.cpu_linear_attn`): the constant per-head decay, the scalar gate
[B, T, H] and the vector gate [B, T, H, K], every gradient (the gate's included), and the constant decay
and the scalar gate over packed documents of DOC_LEN tokens (`cu_seqlens`). Writes <out>.jsonl and
prints each gate's cost over the constant decay at T=4096 against the targets of the gates issue: scalar
<= 1.3x, vector <= 2x.
"""

import argparse
from pathlib import Path

import torch

from lasp.bench.common import environment, median_time, write_jsonl
from lasp.cli import at_least, usage_error, writable
from lasp.kernels import linear_attn

B, H, D = 1, 4, 64
FORMS = ("decay", "scalar", "vector", "decay-docs", "scalar-docs")
DOC_LEN = 300  # tokens per packed document: starts fall anywhere in the 64-token blocks
TARGETS = {"scalar": 1.3, "vector": 2.0}


def _step(form: str, T: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, D, generator=gen)
    if form.startswith("decay"):
        kw = {"log_decay": -torch.linspace(0.01, 0.5, H)}
    else:
        shape = (B, T, H, D) if form == "vector" else (B, T, H)
        kw = {"gate": (-torch.rand(*shape, generator=gen) * 0.2).requires_grad_()}
    if form.endswith("-docs"):
        kw["cu_seqlens"] = list(range(0, T, min(DOC_LEN, max(T // 3, 1))))  # at least 3 documents

    def run():
        linear_attn(q, k, v, **kw).backward(do)
        q.grad = k.grad = v.grad = None
        if "gate" in kw:
            kw["gate"].grad = None

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lasp.bench.gated", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/gated"))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    usage_error(p, at_least("--lengths", a.lengths) + at_least("--reps", a.reps)
                + writable("--out", a.out.with_suffix(".jsonl")))
    env = environment()
    print(f"linear_attn fwd+bwd, fp32, B={B} H={H} K=V={D}; {env['hardware']['cpu']}, "
          f"{env['hardware']['threads']} threads", flush=True)
    rows, t = [], {}
    for T in a.lengths:
        for form in FORMS:
            sec = median_time(_step(form, T), reps=a.reps)
            t[form, T] = sec
            rows.append({"form": form, "T": T, "B": B, "H": H, "K": D, "V": D, "dtype": "float32", "seconds": sec,
                         "tokens_per_s": B * T / sec, "over_decay": sec / t["decay", T], **env})
            print(f"  {form:11s} T={T:6d}  {sec * 1e3:8.1f} ms  {sec / t['decay', T]:5.2f}x the constant decay",
                  flush=True)
    write_jsonl(a.out.with_suffix(".jsonl"), rows)
    T = 4096 if 4096 in a.lengths else max(a.lengths)
    for form, target in TARGETS.items():
        ratio = t[form, T] / t["decay", T]
        print(f"{form} gate at T={T}: {ratio:.2f}x the constant decay (target <= {target}x): "
              f"{'PASS' if ratio <= target else 'FAIL'}")
    print(f"wrote {a.out.with_suffix('.jsonl')}")


if __name__ == "__main__":
    main()
