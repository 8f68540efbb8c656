"""Scaling benchmarks of the SP methods: LASP-2 against LASP-1, Ulysses, LASP-2H and Ring.

    python -m lasp.bench.sp cpu [--out results/sp]          # the whole CPU sweep here: the three steps below
    torchrun --standalone --nproc-per-node 4 -m lasp.bench.sp sweep [--world-sizes 1 2 4] [--seq-lens ...]
    python -m lasp.bench.sp simulate [--world-sizes 1 2 4 8] [--seq-lens ...]
    python -m lasp.bench.sp model [--link fit | nvlink4-h100 | ib-ndr400 | a100-nvswitch-600]
    python -m lasp.bench.sp predict [--config configs/linear-llama3-1b.yaml] [--link nvlink4-h100] [--tflops 400]
    python -m lasp.bench.sp methods [--world-sizes 2 4 8]     # lasp2 / lasp1 / allscan / logscan and auto

sweep: every method, W (sub-groups of one launch) and N measured on real process groups, with the
interconnect's calibration; simulate: each rank's compute of any W, one process (no communication);
model: the alpha-beta cost model priced with the calibration (or a preset), its prediction for every
measured point printed with its error; predict: MODELLED whole-model steps at W ranks and N tokens on a
link preset, compute from the model's FLOPs at an assumed rate; methods: the four ways of combining the
linear states (lasp.sp.core) measured against the cost model, `auto`'s pick in every cell, and the model's
extrapolation to 256 GPUs (lasp.bench.sp.combine). Everything goes to --out as JSONL and CSV.
"""

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from lasp.bench.sp.methods import DTYPES, METHODS
from lasp.cli import at_least, existing, processes, usage_error, writable
from lasp.sp.cost import PRESETS

CPU_DEFAULTS = dict(world_sizes=[1, 2, 4], seq_lens=[1024, 4096], tokens_per_rank=[512])


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--world-sizes", type=int, nargs="+", default=CPU_DEFAULTS["world_sizes"])
    p.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=CPU_DEFAULTS["seq_lens"],
        help="global lengths N measured at every W (strong scaling)",
    )
    p.add_argument(
        "--tokens-per-rank",
        type=int,
        nargs="*",
        default=CPU_DEFAULTS["tokens_per_rank"],
        help="N = this x W at every W (weak scaling)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/sp"))


def _problems(a) -> list[str]:
    p = at_least("--world-sizes", a.world_sizes) + at_least("--seq-lens", a.seq_lens)
    p += at_least("--tokens-per-rank", a.tokens_per_rank) + at_least("--reps", a.reps)
    for name in ("batch", "heads", "kv_heads", "head_dim"):
        p += at_least(f"--{name.replace('_', '-')}", getattr(a, name))
    if a.heads >= 1 and a.kv_heads >= 1 and a.heads % a.kv_heads:
        p.append(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    return p + writable("--out", a.out, directory=True)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r if not isinstance(r[k], (list, dict))})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def simulate_main(a) -> None:
    from lasp.bench.common import environment, write_jsonl
    from lasp.bench.sp.simulate import ConcurrentSimulator, simulate
    from lasp.bench.sp.sweep import cases

    todo = cases(
        a.methods,
        a.world_sizes,
        a.seq_lens,
        a.tokens_per_rank,
        B=a.batch,
        H=a.heads,
        Hkv=a.kv_heads,
        D=a.head_dim,
        layout=a.layout,
        dtype=a.dtype,
    )
    rows, env = [], environment()
    pool = ConcurrentSimulator(max(a.world_sizes)) if a.concurrent else None
    how = f"{max(a.world_sizes)} processes, the ranks of a case at once" if pool else "every rank in turn, one process"
    print(f"simulating {len(todo)} cases, {how}", flush=True)
    for i, case in enumerate(todo):
        why = case.unsupported()
        if why:
            got = [{**case.__dict__, "skipped": why}]
        elif pool:
            got = pool.run(case, a.reps, check_ranks=not a.no_check_ranks)
        else:
            got = simulate(case, a.reps, check_ranks=not a.no_check_ranks)
        rows += [{**r, **env} for r in got]
        worst = "skipped: " + why if why else f"{max(r['step_s'] for r in got) * 1e3:9.1f} ms (slowest rank)"
        print(f"  [{i + 1}/{len(todo)}] {case.method:14s} W={case.W} N={case.N:7d}  {worst}", flush=True)
    if pool:
        pool.close()
    write_jsonl(a.out / "simulated.jsonl", rows)
    _write_csv(a.out / "simulated.csv", rows)
    print(f"wrote {a.out / 'simulated.jsonl'}")


def model_main(a) -> None:
    from lasp.bench.common import write_jsonl
    from lasp.bench.sp import model

    measured = model.read_jsonl(a.out / "measured.jsonl")
    simulated = model.read_jsonl(a.out / "simulated.jsonl")
    calibration = model.read_jsonl(a.out / "calibration.jsonl") if a.link == "fit" else []
    link = model.link_for(a.link, calibration, a.overlap)
    cores = a.cores or next((r.get("cores") for r in measured if r.get("cores")), None)
    print(
        f"link {link.name}: alpha {link.alpha_s * 1e6:.1f} us, bus bandwidth {link.busbw_bytes_per_s / 1e9:.3f} GB/s, "
        f"overlap {link.overlap}; {cores} cores for the measured processes"
    )
    rows = model.validate(measured, simulated, link, cores)
    print(model.table(rows))
    write_jsonl(a.out / "validation.jsonl", rows)
    _write_csv(a.out / "validation.csv", rows)
    _write_csv(a.out / "measured.csv", measured)
    from lasp.bench.sp.plots import plot_all

    for path in plot_all(a.out, measured, rows):
        print(f"wrote {path}")


def predict_main(a) -> None:
    import yaml

    from lasp.bench.common import environment, write_jsonl
    from lasp.bench.sp.predict import plot, sweep
    from lasp.model.config import ModelConfig

    model = ModelConfig(**(yaml.safe_load(Path(a.config).read_text()) or {}).get("model", {}))
    link = PRESETS[a.link]
    rows = [
        {**r, "config": a.config, **environment()}
        for r in sweep(model, a.world_sizes, a.seq_lens, link, a.tflops, a.batch)
    ]
    write_jsonl(a.out / "predicted.jsonl", rows)
    _write_csv(a.out / "predicted.csv", rows)
    W = 64 if 64 in a.world_sizes else max(a.world_sizes)
    plot(rows, a.out / f"predicted_W{W}.png", W)
    print(f"MODELLED ({a.config}, {link.name}: {link.source}; {a.tflops:g} TFLOP/s per device assumed)")
    methods = ("lasp2", "lasp1", "ulysses", "ring")
    print("| W | N | " + " | ".join(f"{m} tokens/s" for m in methods) + " | LASP-2 / LASP-1 | LASP-2 / Ring |")
    print("|---|---|---|---|---|---|---|---|")
    for W_ in a.world_sizes:
        for N in a.seq_lens:
            got = {r["method"]: r for r in rows if r["W"] == W_ and r["N"] == N and "skipped" not in r}
            if "lasp2" in got:
                cells = [f"{got[m]['tokens_per_s']:,.0f}" if m in got else "-" for m in methods]
                ratios = [got["lasp2"]["tokens_per_s"] / got[m]["tokens_per_s"] for m in ("lasp1", "ring")]
                print(f"| {W_} | {N} | " + " | ".join(cells) + "".join(f" | {x:.3f}" for x in ratios) + " |")
    print(f"wrote {a.out / 'predicted.jsonl'} and {a.out / f'predicted_W{W}.png'}")


def cpu_main(a) -> None:
    """The whole CPU sweep: torchrun the measurement, simulate, model."""
    W = max(a.world_sizes)
    common = [
        "--train-step" if a.train_step else "--no-train-step",
        "--methods",
        *a.methods,
        "--world-sizes",
        *map(str, a.world_sizes),
        "--seq-lens",
        *map(str, a.seq_lens),
        "--tokens-per-rank",
        *map(str, a.tokens_per_rank),
        "--reps",
        str(a.reps),
        "--out",
        str(a.out),
        "--batch",
        str(a.batch),
        "--heads",
        str(a.heads),
        "--kv-heads",
        str(a.kv_heads),
        "--head-dim",
        str(a.head_dim),
        "--layout",
        a.layout,
        "--dtype",
        a.dtype,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    print(f"sweep: torchrun, {W} gloo processes", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={W}",
            "-m",
            "lasp.bench.sp",
            "sweep",
            *common,
        ],
        check=True,
        env=env,
    )
    simulate_main(a)
    model_main(a)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["methods"]:
        from lasp.bench.sp.combine import main as methods_main

        return methods_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.sp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("methods", help="the four ways of combining linear states and auto (see its --help)")
    p_pred = sub.add_parser("predict")
    p_pred.add_argument("--config", default="configs/linear-llama3-1b.yaml", help="a trainer YAML: its model section")
    p_pred.add_argument("--link", default="nvlink4-h100", choices=list(PRESETS))
    p_pred.add_argument("--world-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p_pred.add_argument("--seq-lens", type=int, nargs="+", default=[2048 * 2**k for k in range(12)])
    p_pred.add_argument("--tflops", type=float, default=400.0, help="sustained TFLOP/s per device (assumed)")
    p_pred.add_argument("--batch", type=int, default=1)
    p_pred.add_argument("--out", type=Path, default=Path("results/sp"))
    for name in ("cpu", "sweep", "simulate", "model"):
        s = sub.add_parser(name)
        _shared(s)
        if name in ("sweep", "cpu"):
            s.add_argument("--timeout", type=int, default=300, help="collective timeout, seconds")
            s.add_argument(
                "--train-step",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="also a whole hybrid Linear-Llama training step at SP = W, DP = launch / W",
            )
        if name in ("sweep", "simulate", "cpu"):
            s.add_argument("--no-check-ranks", action="store_true", help="measure with check_ranks=False")
        if name in ("simulate", "cpu"):
            s.add_argument(
                "--concurrent",
                action=argparse.BooleanOptionalAction,
                default=name == "cpu",
                help="simulate the W ranks of a case in W processes at once (CPU: they share the "
                "machine as in the run); default for cpu, not for simulate",
            )
        if name in ("model", "cpu"):
            s.add_argument("--link", default="fit", choices=["fit", *PRESETS])
            s.add_argument(
                "--overlap",
                type=float,
                default=0.0,
                help="with --link fit: the share of LASP-2's intra compute that hides its all-gather "
                "(0 on a CPU whose cores also run the collective)",
            )
            s.add_argument(
                "--cores",
                type=int,
                default=None,
                help="cores the measured processes shared (default: recorded by the sweep)",
            )
    a = p.parse_args(argv)
    if a.step == "predict":
        problems = at_least("--world-sizes", a.world_sizes) + at_least("--seq-lens", a.seq_lens)
        problems += at_least("--batch", a.batch) + ([] if a.tflops > 0 else [f"--tflops must be > 0, got {a.tflops}"])
        problems += existing("--config", a.config)
        usage_error(p, problems + writable("--out", a.out, directory=True))
        a.out.mkdir(parents=True, exist_ok=True)
        return predict_main(a)
    problems = _problems(a)
    if a.step == "cpu":
        problems += processes("--world-sizes", max(a.world_sizes, default=1))
    usage_error(p, problems)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.step == "sweep":
        if "RANK" not in os.environ:
            p.error(
                "sweep runs under torchrun (torchrun --nproc-per-node W -m lasp.bench.sp sweep ...), "
                "or use `cpu` to launch it here"
            )
        from lasp.bench.sp.sweep import run

        run(a)
    elif a.step == "simulate":
        simulate_main(a)
    elif a.step == "model":
        model_main(a)
    else:
        cpu_main(a)


if __name__ == "__main__":
    main()
