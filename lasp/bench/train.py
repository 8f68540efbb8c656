"""Training benchmark: tokens/s and peak memory of the quick-start model, and the memory of the loss.

    python -m lasp.bench.train [--nprocs 1 2] [--steps 30] [--out results/train]

1. The quick-start config (configs/cpu-quickstart.yaml) trained through torchrun with SP = nprocs
   (gloo on CPU): the median tokens/s over the steps after the first few, and the peak memory per rank
   (resident set on CPU, allocated memory on a GPU), read from the run's metrics.jsonl.
2. The MoE row: the CPU MoE config (configs/cpu-moe.yaml, SP = 2 on 2 processes) at each --moe-ep:
   tokens/s, peak memory, the first and last loss, and the bytes each rank sends per MoE layer through
   all-to-all (megatron's token dispatcher) beside the all-gather bytes per layer (LASP-2 / LASP-2H),
   counted by the profiler over one training step (lasp.bench.moe_comm).
3. The LM head + cross-entropy alone at 64K local tokens and a 32K vocabulary, forward + backward:
   peak memory of the chunked loss against the plain one (target: chunked < 1/4 of plain).
Writes <out>.jsonl (one row per measurement, with the environment) and <out>.png.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lasp.bench.common import environment, write_jsonl
from lasp.cli import at_least, processes, usage_error, writable

ROOT = Path(__file__).resolve().parents[2]
WARMUP_STEPS = 3


def _overrides(nprocs: int, steps: int, data: str, run_dir: str, ep: int | None = None) -> list[str]:
    """The `--set` overrides of one training run of the benchmark (`ep`: parallel.ep of the MoE row)."""
    sets = {
        **({"parallel.ep": ep} if ep else {}),
        "parallel.sp": nprocs,
        "train.steps": steps,
        "train.eval_interval": 0,
        "logging.run_dir": run_dir,
        "logging.tensorboard": "false",
        "logging.plot": "false",
        "logging.progress": "false",
        "data.path": data,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def train_throughput(nprocs: int, steps: int, config: str, data: str, ep: int | None = None) -> dict:
    """Train `config` for `steps` steps with SP = nprocs; median tokens/s after warm-up, peak GiB."""
    with tempfile.TemporaryDirectory(prefix="lasp-bench-train-") as run_dir:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nprocs}",
            "-m",
            "lasp.train",
            "--config",
            config,
        ]
        for item in _overrides(nprocs, steps, data, run_dir, ep):
            cmd += ["--set", item]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        out = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"training with {nprocs} process(es) failed:\n{out.stderr[-4000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r["kind"] == "train"]
    rates = [r["tokens_per_s"] for r in rows[WARMUP_STEPS:]]
    return {
        "what": "train",
        "nprocs": nprocs,
        "sp": nprocs,
        "steps": steps,
        "tokens_per_step": rows[0]["tokens"],
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "peak_mem_gib_rank0": max(r["mem_gib"] for r in rows),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        **(
            {"ep": ep, "config": os.path.basename(config), "moe_load_max_last": rows[-1].get("moe_load_max")}
            if ep
            else {}
        ),
    }


def moe_comm(config: str, ep: int) -> dict:
    """lasp.bench.moe_comm's row: the bytes per MoE layer (all-to-all) and per layer (all-gather)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lasp.bench.moe_comm",
        "--config",
        config,
        "--ep",
        str(ep),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"counting the MoE communication at ep = {ep} failed:\n{out.stderr[-4000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


def _run_problems(config: str, nprocs: list[int], steps: int, data: str, ep: int | None = None) -> list[str]:
    """What is wrong with each training run, found as lasp.train would find it, before torchrun starts."""
    import torch

    from lasp.train.config import ConfigError, load_config

    problems: list[str] = []
    seen: set[str] = set()  # a problem of the config itself comes back for every --nprocs
    for n in nprocs:
        if n < 1:
            problems += at_least("--nprocs", n)
            continue
        device = "auto"
        try:
            device = load_config(
                config, _overrides(n, steps, data, tempfile.gettempdir(), ep), world_size=n
            ).train.device
        except ConfigError as e:
            problems += [f"--config {config} with --nprocs {n}: {q}" for q in e.problems if q not in seen]
            seen.update(e.problems)
        problems += processes("--nprocs", n, gpus=device == "cuda" or (device == "auto" and torch.cuda.is_available()))
    return problems


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["what"] in ("train", "moe")]
    loss = [r for r in rows if r["what"] == "loss_memory"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    labels = [f"{r['nprocs']} proc" + (f"\nMoE ep={r['ep']}" if r["what"] == "moe" else "") for r in train]
    axes[0].bar(labels, [r["tokens_per_s_median"] for r in train])
    axes[0].set_title("quick-start model: tokens/s (median)")
    axes[1].bar(labels, [r["peak_mem_gib_rank0"] for r in train])
    axes[1].set_title("peak memory per rank (GiB)")
    if loss:
        axes[2].bar(
            [f"plain\n({loss[0]['plain_method']})", f"chunked\n({loss[0]['chunked_method']})"],
            [loss[0]["plain_peak_gib"], loss[0]["chunked_peak_gib"]],
        )
        axes[2].set_title(f"loss alone, {loss[0]['tokens'] // 1024}K tokens x {loss[0]['vocab'] // 1024}K vocab (GiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--config", default="configs/cpu-quickstart.yaml")
    p.add_argument("--moe-config", default="configs/cpu-moe.yaml", help="the MoE row's config (SP = 2)")
    p.add_argument(
        "--moe-ep", type=int, nargs="*", default=[1, 2], help="parallel.ep of each MoE run (none: no MoE row)"
    )
    p.add_argument("--data", default="data/stdlib", help="prepared data (bash scripts/run.sh makes data/stdlib)")
    p.add_argument("--loss-tokens", type=int, default=65536)
    p.add_argument("--loss-vocab", type=int, default=32768)
    p.add_argument("--out", type=Path, default=Path("results/train"))
    a = p.parse_args(argv)
    # where the training runs (cwd ROOT) find them
    a.config, a.moe_config, a.data = str(ROOT / a.config), str(ROOT / a.moe_config), str(ROOT / a.data)
    problems = at_least("--steps", a.steps, low=WARMUP_STEPS + 1)  # tokens/s is read after the warm-up steps
    problems += at_least("--loss-tokens", a.loss_tokens) + at_least("--loss-vocab", a.loss_vocab)
    problems += writable("--out", a.out.with_suffix(".jsonl")) or writable("--out", a.out.with_suffix(".png"))
    problems += [q for ep in a.moe_ep for q in at_least("--moe-ep", ep)]
    problems += _run_problems(a.config, a.nprocs, a.steps, a.data)
    for ep in a.moe_ep:
        # what the main runs already reported (the data, the output) is not repeated
        problems += [
            f"--moe-ep {ep}: {q}"
            for q in _run_problems(a.moe_config, [2], a.steps, a.data, ep)
            if ep >= 1 and not any(q.rsplit(": ", 2)[-2:] == x.rsplit(": ", 2)[-2:] for x in problems)
        ]
    usage_error(p, problems)
    env = environment()
    rows = []
    for n in a.nprocs:
        row = {**train_throughput(n, a.steps, a.config, a.data), **env}
        rows.append(row)
        print(
            f"{n} process(es), sp={n}: {row['tokens_per_s_median']:,.0f} tokens/s (median; "
            f"{row['tokens_per_s_min']:,.0f}-{row['tokens_per_s_max']:,.0f}), peak {row['peak_mem_gib_rank0']:.2f} "
            f"GiB per rank",
            flush=True,
        )
    for ep in a.moe_ep:
        row = {**train_throughput(2, a.steps, a.moe_config, a.data, ep), **moe_comm(a.moe_config, ep), **env}
        row["what"] = "moe"
        rows.append(row)
        print(
            f"MoE ({os.path.basename(a.moe_config)}), sp=2 ep={ep}: {row['tokens_per_s_median']:,.0f} tokens/s "
            f"(median), peak {row['peak_mem_gib_rank0']:.2f} GiB per rank, loss {row['first_loss']:.3f} -> "
            f"{row['last_loss']:.3f}; per rank and step: all-to-all "
            f"{row['all_to_all_bytes_per_moe_layer'] / 2**20:.2f} "
            f"MiB per MoE layer, all-gather {row['all_gather_bytes_per_layer'] / 2**20:.2f} MiB per layer",
            flush=True,
        )
    from lasp.bench.loss_memory import loss_peak_memory

    mem = loss_peak_memory(tokens=a.loss_tokens, vocab=a.loss_vocab)
    ratio = mem["chunked_peak_gib"] / mem["plain_peak_gib"]
    rows.append({"what": "loss_memory", **mem, "ratio": ratio, **env})
    print(
        f"loss alone at {a.loss_tokens} tokens x {a.loss_vocab} vocab: plain {mem['plain_peak_gib']:.2f} GiB "
        f"({mem['plain_method']}), chunked {mem['chunked_peak_gib']:.2f} GiB ({mem['chunked_method']}); "
        f"{ratio:.3f} of plain (target < 0.25: "
        f"{'met' if ratio < 0.25 else 'NOT met'})"
    )
    write_jsonl(a.out.with_suffix(".jsonl"), rows)
    _plot(rows, a.out.with_suffix(".png"))
    print(f"wrote {a.out.with_suffix('.jsonl')} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
