"""Do hybrids keep retrieval where pure linear models lose it? Passkey retrieval of small models trained
alike, on CPU.

    python -m lasp.bench.retrieval [--out DIR] [--steps 3000] [--train-len 512] [--models lightning,...]
    python -m lasp.bench.retrieval --out DIR --collect DIR1,DIR2      # one table and plot from several runs

Every model has the same shape (byte vocabulary, --layers layers of --hidden, 4 heads, 2 KV heads) and is
trained the same way (--steps AdamW steps of --batch sequences of --train-len bytes, one seed) on a
synthetic passkey mixture: prompts of lasp.eval.passkey with their answers, at random lengths up to the
training length, random depths and keys (another seed than the evaluation's), the loss on the answer. Then
passkey accuracy (greedy decoding, lasp.eval.passkey) at 1x, 2x, 4x and 8x the training length, over
--trials keys at 5 depths; 4x and 8x run under SP = 2 (`torchrun --nproc-per-node 2 -m lasp.eval passkey`,
LASP-2 / LASP-2H).

Models: pure linear (lightning: constant decay; simple_gla: a scalar gate; gated_deltanet: the delta rule),
a 3:1 hybrid (LLLS, simple_gla) and all softmax. Writes OUT/retrieval.jsonl (one row per model and length),
OUT/retrieval.png (accuracy against length) and prints a table with the parameter counts and wall times.
Models are independent: runs of a few models each (in parallel, one thread each) are gathered by --collect.
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
    "hybrid LLLS simple_gla": dict(layer_pattern="LLLS", linear_variant="simple_gla"),
    "softmax": dict(layer_pattern="S"),
}


def training_batch(tok, rng: random.Random, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, length + 1] byte ids, [batch, length] labels): passkey prompts with their answers and an
    EOS, each of a random length that fits, at a random depth with a random key, padded with EOS. The
    labels are the answer's tokens and the needle's second copy of the key ("Remember it. 12345", a copy
    from a few tokens back), -100 elsewhere: the loss is retrieval and copying alone. (With the loss on
    every token no model learned the task, softmax included; with the answer alone and 4 rows a step,
    3,000 steps were not enough either: see docs/evaluation.md.)"""
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


def train(name: str, cfg, a, say) -> tuple[object, float]:
    """A model of `cfg` trained on the mixture; (model, seconds)."""
    from lasp.data.tokenizer import ByteTokenizer
    from lasp.model import LinearLlama

    torch.manual_seed(a.seed)
    model = LinearLlama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng, tok = random.Random(a.seed), ByteTokenizer()
    start = time.time()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = training_batch(tok, rng, a.batch, a.train_len)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, a.steps // 5) == 0:
            say(f"{name}: step {step + 1}/{a.steps}, loss {loss.item():.3f}")
    return model.eval(), time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lasp.bench.retrieval",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/bench-retrieval", help="output directory (JSONL, PNG, the models)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, among: {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-len", type=int, default=512, help="training length; evaluation at 1x, 2x, 4x, 8x")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--trials", type=int, default=4, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0, help="the training seed (the evaluation's keys use seed 1234)")
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
    problems += at_least("--steps", a.steps) + at_least("--batch", a.batch) + at_least("--trials", a.trials)
    problems += at_least("--hidden", a.hidden, 8) + at_least("--layers", a.layers)
    from lasp.data.tokenizer import ByteTokenizer
    from lasp.eval.passkey import shortest

    low = shortest(ByteTokenizer()) + 8  # the shortest prompt, its answer and an EOS
    if a.train_len < low:
        problems.append(
            f"--train-len must be at least {low} (a passkey prompt, its answer and an EOS in bytes), got {a.train_len}"
        )
    problems += writable("--out", a.out, directory=True)
    usage_error(p, problems)

    from lasp.data.tokenizer import ByteTokenizer
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
        model, seconds = train(name, cfg, a, say)
        params = sum(t.numel() for t in model.parameters())
        directory = out / name.replace(" ", "-")
        save_pretrained(model, str(directory), tokenizer={"name": "byte"})
        start = time.time()
        near = passkey_accuracy(model, ByteTokenizer(), [n, 2 * n], depths, a.trials, seed=1234)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lasp.eval",
            "passkey",
            "--checkpoint",
            str(directory),
            "--lengths",
            f"{4 * n},{8 * n}",
            "--depths",
            ",".join(map(str, depths)),
            "--trials",
            str(a.trials),
            "--seed",
            "1234",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            sys.exit(f"the SP = 2 evaluation of {name} failed:\n{done.stderr[-3000:]}")
        far = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        eval_seconds = time.time() - start
        for length in (n, 2 * n, 4 * n, 8 * n):
            cells = [r for r in near + far if r["length"] == length]
            rows.append(
                {
                    "model": name,
                    "params": params,
                    "train_len": n,
                    "length": length,
                    "sp": 1 if length <= 2 * n else 2,
                    "accuracy": sum(r["accuracy"] for r in cells) / len(cells),
                    "by_depth": {str(r["depth"]): r["accuracy"] for r in cells},
                    "trials": a.trials,
                    "steps": a.steps,
                    "train_seconds": seconds,
                    "eval_seconds": eval_seconds,
                    **env,
                }
            )
        say(
            f"{name}: {params:,} parameters, trained in {seconds:.0f} s; accuracy "
            + ", ".join(f"{r['length']}: {r['accuracy']:.2f}" for r in rows if r["model"] == name)
        )
        write_jsonl(out / "retrieval.jsonl", rows)  # after each model: a long run interrupted keeps its rows
    return _report(rows, out)


def _collect(p: argparse.ArgumentParser, a) -> int:
    """--collect: the rows of several runs in one JSONL, plot and table (a model in two runs is refused)."""
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
    where: dict[str, list[str]] = {}
    for d, mine in runs.items():
        for name in dict.fromkeys(r["model"] for r in mine):
            where.setdefault(name, []).append(str(d))
    problems += [f"--collect: model {name!r} is in {' and '.join(ds)}" for name, ds in where.items() if len(ds) > 1]
    rows = [r for mine in runs.values() for r in mine]
    usage_error(p, problems + ([] if rows or problems else [f"--collect: no rows in {', '.join(map(str, dirs))}"]))
    write_jsonl(Path(a.out) / "retrieval.jsonl", rows)
    return _report(rows, Path(a.out))


def _report(rows: list[dict], out: Path) -> int:
    """The plot, and the table on stdout."""
    _plot(rows, out / "retrieval.png")
    print(f"| model | parameters | train s | {' | '.join(f'{k}x' for k in (1, 2, 4, 8))} |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        print(
            f"| {name} | {mine[0]['params']:,} | {mine[0]['train_seconds']:.0f} | "
            + " | ".join(f"{r['accuracy']:.2f}" for r in mine)
            + " |"
        )
    print(f"rows: {out / 'retrieval.jsonl'}; plot: {out / 'retrieval.png'}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        ax.plot([r["length"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"passkey prompt length (trained at {rows[0]['train_len']})")
    ax.set_ylabel("accuracy (greedy, 5 depths)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
