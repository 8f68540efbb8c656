"""Do hybrids keep retrieval where pure linear models lose it? Passkey retrieval of small models trained
alike, on CPU.

    python -m lasp.bench.retrieval [--out DIR] [--models gated_deltanet,...] [--seeds 0,1,2] [--steps 1000]
    python -m lasp.bench.retrieval --out DIR --collect DIR1,DIR2      # one table and plot from several runs

Every model has the same shape (byte vocabulary, --layers layers of --hidden, 4 heads, 2 KV heads) and is
trained the same way, once per seed of --seeds (--steps AdamW steps of --batch sequences of --train-len
bytes, --lr after --warmup steps) on a synthetic passkey mixture: prompts of lasp.eval.passkey with their
answers, at random lengths up to the training length, random depths and keys (the seed's, never the
evaluation's), the loss on the answer. Then passkey accuracy (greedy decoding, lasp.eval.passkey) at 1x,
2x, 4x and 8x the training length, over --trials keys at 5 depths; 4x and 8x run under SP = 2 (`torchrun
--nproc-per-node 2 -m lasp.eval passkey`, LASP-2 / LASP-2H).

Models: pure linear (lightning: constant decay; simple_gla: a scalar gate; gated_deltanet: the delta rule),
all softmax, and 3:1 hybrids of simple_gla or Gated DeltaNet with the softmax layer last (LLLS) or in the
middle (LLSL). Writes OUT/retrieval.jsonl (one row per model, seed and length, with the training loss
curve and a probe of what each layer contributes), OUT/retrieval.png (mean accuracy against length, the
seeds' range shaded) and prints a table: per model the mean over the seeds and their range. A progress bar
per model and seed on stderr. Models are independent: runs of a few models each (in parallel, one thread
each) are gathered by --collect.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lasp.bench.common import environment, write_jsonl

MODELS = {
    "lightning": dict(layer_pattern="L", linear_variant="lightning"),
    "simple_gla": dict(layer_pattern="L", linear_variant="simple_gla"),
    "gated_deltanet": dict(layer_pattern="L", linear_variant="gated_deltanet"),
    "softmax": dict(layer_pattern="S"),
    "hybrid LLLS simple_gla": dict(layer_pattern="LLLS", linear_variant="simple_gla"),
    "hybrid LLSL simple_gla": dict(layer_pattern="LLSL", linear_variant="simple_gla"),
    "hybrid LLLS gated_deltanet": dict(layer_pattern="LLLS", linear_variant="gated_deltanet"),
    "hybrid LLSL gated_deltanet": dict(layer_pattern="LLSL", linear_variant="gated_deltanet"),
}
"""The layer pattern repeats over --layers: with 4 layers, LLLS is the 3:1 hybrid with softmax last (every 4th
layer, Qwen3-Next's layout with Gated DeltaNet) and LLSL the same with softmax in the middle."""


def training_batch(tok, rng: random.Random, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, length + 1] byte ids, [batch, length] labels): passkey prompts with their answers and an
    EOS, each of a random length that fits, at a random depth with a random key, padded with EOS. The
    labels are the answer's tokens and the needle's second copy of the key ("Remember it. 12345", a copy
    from a few tokens back), -100 elsewhere: the loss is retrieval and copying alone. (Measured 2026-12-05:
    with the loss on every token no model learned the task, softmax included; with the answer alone and 4
    rows a step, 3,000 steps were not enough either.)"""
    from lasp.eval.passkey import NEEDLE, make_prompt, shortest

    low = shortest(tok)
    rows, labels = [], []
    for _ in range(batch):
        key = str(rng.randint(10000, 99999))
        p = make_prompt(tok, rng.randint(low, length - 7), rng.random(), key)
        ids = (p.ids + p.answer + [tok.eos_id])[: length + 1]
        rows.append(ids + [tok.eos_id] * (length + 1 - len(ids)))
        y = [-100] * length
        for i, t in enumerate(p.answer):
            y[len(p.ids) - 1 + i] = t
        needle = NEEDLE.format(key=key)
        second = p.needle_at + len(tok.encode(needle[: needle.index(key, needle.index(key) + 1)]))
        for i in range(second, second + len(tok.encode(key))):
            y[i - 1] = ids[i]
        labels.append(y)
    return torch.tensor(rows), torch.tensor(labels)


def labelled_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy on the labelled tokens of a `training_batch` (x [B, T + 1], y [B, T])."""
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), y.flatten(), ignore_index=-100)


EVAL_SEED = 1234
"""The evaluation's keys: the same prompts for every model, and none of the training seeds' batches."""


def train(name: str, cfg, a, seed: int) -> tuple[object, float, list[dict]]:
    """A model of `cfg` trained on the mixture from `seed` (its initial weights and its batches); (model,
    seconds, the curve). The curve has a point per twentieth of the run: the step, the labelled-token loss
    averaged since the last point, the largest gradient norm (before clipping) since then, and at the
    point's step the mean size (L2 norm) of what each layer's mixer adds to the residual stream at the
    labelled tokens and of the stream there before the final norm (`mixer_out`, `stream`): how the 3:1
    hybrid's stall was found (docs/evaluation.md, "Why the 3:1 hybrid learned nothing")."""
    from tqdm import tqdm

    from lasp.data.tokenizer import ByteTokenizer
    from lasp.model import LinearLlama

    torch.manual_seed(seed)
    model = LinearLlama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng, tok = random.Random(seed), ByteTokenizer()
    sizes: dict[str, float] = {}
    labelled: list[torch.Tensor] = []

    def measure(key: str, t: torch.Tensor) -> None:
        sizes[key] = t.detach()[labelled[0]].norm(dim=-1).mean().item()

    hooks = [
        block.mixer.register_forward_hook(lambda m, args, out, i=i: measure(f"mixer{i}", out))
        for i, block in enumerate(model.layers)
    ]
    hooks.append(model.norm.register_forward_hook(lambda m, args, out: measure("stream", args[0])))
    every, losses, norms, curve = max(1, a.steps // 20), [], [], []
    start = time.time()
    bar = tqdm(range(a.steps), desc=f"{name} seed {seed}", unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        x, y = training_batch(tok, rng, a.batch, a.train_len)
        labelled[:] = [y != -100]
        loss = labelled_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == a.steps:
            curve.append(
                {
                    "step": step + 1,
                    "loss": sum(losses) / len(losses),
                    "grad_norm_max": max(norms),
                    "mixer_out": [round(sizes[f"mixer{i}"], 4) for i in range(len(model.layers))],
                    "stream": round(sizes["stream"], 4),
                }
            )
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
            losses, norms = [], []
    bar.close()
    for h in hooks:
        h.remove()
    return model.eval(), time.time() - start, curve


def probe(model, a) -> dict:
    """What each layer contributes, on a held-out batch of the mixture (the evaluation's seed): the labelled
    loss, the same with each layer's mixer output zeroed in turn (a mixer whose removal leaves the loss
    unchanged carries nothing the answer uses), and the gradient's L2 norm on the embedding, each layer's
    mixer and MLP, and the LM head."""
    from lasp.data.tokenizer import ByteTokenizer

    x, y = training_batch(ByteTokenizer(), random.Random(EVAL_SEED), a.batch, a.train_len)

    without = []
    for block in model.layers:
        hook = block.mixer.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
        with torch.no_grad():
            without.append(round(labelled_loss(model, x, y).item(), 4))
        hook.remove()
    model.zero_grad()
    full = labelled_loss(model, x, y)
    full.backward()

    def norm(module) -> float:
        return round(sum(p.grad.pow(2).sum().item() for p in module.parameters() if p.grad is not None) ** 0.5, 4)

    grads = {
        "embed": norm(model.embed),
        "mixer": [norm(b.mixer) for b in model.layers],
        "mlp": [norm(b.mlp) for b in model.layers],
        "lm_head": norm(model.lm_head),
    }
    model.zero_grad()
    return {"loss": round(full.item(), 4), "loss_without_mixer": without, "grad_norm": grads}


def _far(directory: Path, lengths: list[int], depths: list[float], trials: int, name: str) -> list[dict]:
    """Passkey accuracy at `lengths` under SP = 2: `torchrun --nproc-per-node 2 -m lasp.eval passkey`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "lasp.eval", "passkey", "--checkpoint", str(directory), "--lengths", ",".join(map(str, lengths))]
    cmd += ["--depths", ",".join(map(str, depths)), "--trials", str(trials), "--seed", str(EVAL_SEED)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"the SP = 2 evaluation of {name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.retrieval",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/bench-retrieval", help="output directory (JSONL, PNG, the models)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, among: {', '.join(MODELS)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated: one model trained per seed")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-len", type=int, default=256, help="training length; evaluation at 1x, 2x, 4x, 8x")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate (constant after warm-up)")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up to --lr")
    p.add_argument("--trials", type=int, default=4, help="keys per (length, depth)")
    p.add_argument(
        "--collect",
        default=None,
        metavar="DIR,...",
        help="train nothing: gather the rows of earlier runs' DIR/retrieval.jsonl into OUT, with the plot "
        "and the table",
    )
    a = p.parse_args(argv)
    from lasp.cli import at_least, usage_error, writable

    if a.collect is not None:
        return _collect(p, a)

    names = [m.strip() for m in a.models.split(",") if m.strip()]
    problems = [f"--models: unknown {m!r} (known: {', '.join(MODELS)})" for m in names if m not in MODELS]
    problems += [] if names else ["--models: no model given"]
    seeds, bad = [], []
    for t in (t.strip() for t in a.seeds.split(",")):
        (seeds.append(int(t)) if t.isdigit() else bad.append(t))
    problems += [f"--seeds: {t!r} is not a non-negative integer" for t in bad]
    problems += [] if seeds or bad else ["--seeds: no seed given"]
    problems += [f"--seeds: {s} is given twice" for s in sorted({s for s in seeds if seeds.count(s) > 1})]
    if EVAL_SEED in seeds:
        problems.append(f"--seeds: {EVAL_SEED} is the evaluation's seed (its keys would be trained on)")
    problems += at_least("--steps", a.steps) + at_least("--batch", a.batch) + at_least("--trials", a.trials)
    problems += at_least("--hidden", a.hidden, 8) + at_least("--layers", a.layers) + at_least("--warmup", a.warmup)
    from lasp.data.tokenizer import ByteTokenizer
    from lasp.eval.passkey import shortest

    low = shortest(ByteTokenizer()) + 8  # the shortest prompt, its answer and an EOS
    if a.train_len < low:
        problems.append(
            f"--train-len must be at least {low} (a passkey prompt, its answer and an EOS in bytes), got {a.train_len}"
        )
    problems += writable("--out", a.out, directory=True)
    usage_error(p, problems)

    from lasp.eval.passkey import passkey_accuracy
    from lasp.model import ModelConfig, save_pretrained

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    n = a.train_len
    rows, env = [], environment()
    for name in names:
        cfg = ModelConfig(
            vocab_size=257,
            hidden_size=a.hidden,
            num_layers=a.layers,
            num_heads=4,
            num_kv_heads=2,
            ffn_hidden_size=a.hidden * 3,
            **MODELS[name],
        )
        for seed in seeds:
            model, seconds, curve = train(name, cfg, a, seed)
            probed = probe(model, a)
            params = sum(t.numel() for t in model.parameters())
            directory = out / name.replace(" ", "-") / f"seed-{seed}"
            save_pretrained(model, str(directory), tokenizer={"name": "byte"})
            start = time.time()
            near = passkey_accuracy(model, ByteTokenizer(), [n, 2 * n], depths, a.trials, seed=EVAL_SEED)
            far = _far(directory, [4 * n, 8 * n], depths, a.trials, name)
            eval_seconds = time.time() - start
            mine = []
            for length in (n, 2 * n, 4 * n, 8 * n):
                cells = [r for r in near + far if r["length"] == length]
                mine.append(
                    {
                        "model": name,
                        "seed": seed,
                        "params": params,
                        "train_len": n,
                        "length": length,
                        "sp": 1 if length <= 2 * n else 2,
                        "accuracy": sum(r["accuracy"] for r in cells) / len(cells),
                        "by_depth": {str(r["depth"]): r["accuracy"] for r in cells},
                        "trials": a.trials,
                        "steps": a.steps,
                        "lr": a.lr,
                        "warmup": a.warmup,
                        "final_loss": curve[-1]["loss"],
                        "loss_curve": curve,
                        "probe": probed,
                        "train_seconds": seconds,
                        "eval_seconds": eval_seconds,
                        **env,
                    }
                )
            rows += mine
            say(
                f"{name} seed {seed}: {params:,} parameters, trained in {seconds:.0f} s, final loss "
                f"{curve[-1]['loss']:.3f}; accuracy " + ", ".join(f"{r['length']}: {r['accuracy']:.2f}" for r in mine)
            )
            write_jsonl(out / "retrieval.jsonl", rows)  # after each model: an interrupted run keeps its rows
    return _report(rows, out)


def _collect(p: argparse.ArgumentParser, a) -> int:
    """--collect: the rows of several runs in one JSONL, plot and table (a model trained from the same seed
    in two runs is refused)."""
    from lasp.cli import usage_error, writable

    dirs = [Path(d.strip()) for d in a.collect.split(",") if d.strip()]
    problems = [] if dirs else ["--collect: no directory given"]
    problems += [
        f"--collect: {d / 'retrieval.jsonl'} does not exist" for d in dirs if not (d / "retrieval.jsonl").is_file()
    ]
    problems += writable("--out", a.out, directory=True)
    runs = {
        d: [json.loads(line) for line in (d / "retrieval.jsonl").read_text().splitlines() if line.strip()]
        for d in dirs
        if (d / "retrieval.jsonl").is_file()
    }
    where: dict[tuple[str, int], list[str]] = {}
    for d, mine in runs.items():
        for model, seed in dict.fromkeys((r["model"], r.get("seed", 0)) for r in mine):
            where.setdefault((model, seed), []).append(str(d))
    problems += [
        f"--collect: model {model!r} seed {seed} is in {' and '.join(ds)}"
        for (model, seed), ds in where.items()
        if len(ds) > 1
    ]
    rows = [r for mine in runs.values() for r in mine]
    usage_error(p, problems + ([] if rows or problems else [f"--collect: no rows in {', '.join(map(str, dirs))}"]))
    write_jsonl(Path(a.out) / "retrieval.jsonl", rows)
    return _report(rows, Path(a.out))


def _spread(values: list[float]) -> str:
    """'mean (min-max)' over the seeds; the value alone for one seed."""
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def _by_model(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """{model: {length: [the row of each seed]}}, the models in MODELS' order (others after, as they come)."""
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["model"], {}).setdefault(r["length"], []).append(r)
    order = list(MODELS)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _report(rows: list[dict], out: Path) -> int:
    """The plot, and the table on stdout: per model and length the mean accuracy over the seeds and its
    range."""
    _plot(rows, out / "retrieval.png")
    print(f"| model | parameters | seeds | train s | final loss | {' | '.join(f'{k}x' for k in (1, 2, 4, 8))} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, lengths in _by_model(rows).items():
        first = next(iter(lengths.values()))
        loss = [r["final_loss"] for r in first if "final_loss" in r]
        print(
            f"| {name} | {first[0]['params']:,} | {len(first)} | "
            f"{sum(r['train_seconds'] for r in first) / len(first):.0f} | {_spread(loss) if loss else '-'} | "
            + " | ".join(_spread([r["accuracy"] for r in mine]) for mine in lengths.values())
            + " |"
        )
    print(f"rows: {out / 'retrieval.jsonl'}; plot: {out / 'retrieval.png'}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    """Mean accuracy against length per model, the band between the seeds' lowest and highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, lengths in _by_model(rows).items():
        x = list(lengths)
        acc = [[r["accuracy"] for r in mine] for mine in lengths.values()]
        (line,) = ax.plot(x, [sum(v) / len(v) for v in acc], marker="o", label=f"{name} ({len(acc[0])} seeds)")
        if len(acc[0]) > 1:
            ax.fill_between(x, [min(v) for v in acc], [max(v) for v in acc], color=line.get_color(), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"passkey prompt length (trained at {rows[0]['train_len']}; 4x and 8x under SP = 2)")
    ax.set_ylabel("accuracy (greedy, 5 depths): mean, seeds' range")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
