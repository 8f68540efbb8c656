"""Linearise a real pretrained Llama with LASP's trainer: SmolLM2-135M-Instruct into a 3:1 hybrid, on CPU.

    bash examples/smollm2_linearise.sh            (installs what it needs into .venv, then runs this)

The recipe (LoLCATs' two stages, with Liger's gate), every step through `python -m lasp.train`:

- the hybrid: every 4th layer stays softmax (LLLS); the others become linear layers that reuse the layer's
  q, k, v, o: a scalar gate pooled from the key projection (Liger: no new parameters; divided by
  --gate-normalizer, so that it starts close to no decay and the sink tokens stay in reach), Hedgehog feature
  maps on the RoPE'd q and k (LoLCATs: starting at the identity), and an exact softmax window of the last
  --window tokens beside the linear branch;
- stage 1, attention transfer (train.objective = attention_transfer, train.trainable = new): each linear
  layer's output is trained to match its own softmax attention; only the feature maps train;
- stage 2, fine-tuning with the LM loss through LoRA adapters on q, k, v, o (train.trainable = lora),
  starting from stage 1's export; the export merges the adapters;
- the baseline: stage 2 alone from the converted weights, for as many tokens as both stages together.

Measured on held-out text (the standard library's json package, which the training text leaves out):
perplexity of the teacher (every layer softmax), of the hybrid with no training, after stage 1, after
stage 2 and of the baseline; the per-layer attention error before and after stage 1; tokens and wall time.
Written to WORK/results.json and printed as a table.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import sysconfig
import time

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN_TEXT = ["email", "asyncio", "concurrent", "http", "importlib", "logging", "unittest", "xml"]  # packages
HELD_OUT = sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")))


def hybrid_fields(window: int, gate_normalizer: float = 256.0) -> dict:
    return dict(
        layer_pattern="LLLS",
        linear_variant="simple_gla",
        gate_source="key",
        feature_map="hedgehog",
        linear_rope=True,
        window=window,
        output_norm=False,
        gate_normalizer=gate_normalizer,
    )


def held_out_windows(hf: str, seq_len: int, tokens: int) -> torch.Tensor:
    """[n, seq_len + 1] token windows of the json package's sources (the same for every model)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
    ids = [i for path in HELD_OUT for i in tok.encode(open(path).read()).ids]
    n = min(tokens // seq_len, (len(ids) - 1) // (seq_len + 1))
    return torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [torch.nn.functional.cross_entropy(model(w[None, :-1])[0].double(), w[1:]).item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def attention_errors(model, windows: torch.Tensor) -> list[float]:
    """Per linear layer: the squared error of its output against its own softmax attention, per token
    (averaged over heads and dims), as train.objective = attention_transfer measures it. Leaves `model` in
    attention transfer."""
    from lasp.parallel import attention_transfer

    mixers = attention_transfer(model)
    sums = [0.0] * len(mixers)
    for w in windows:
        model(w[None, :-1])
        for i, m in enumerate(mixers):
            sums[i] += float(sum(m.transfer))
    return [s / windows[:, :-1].numel() for s in sums]


def run(cmd: list[str], log: str) -> float:
    """Run a LASP command, its output into `log` (and its last lines on failure); returns the wall time."""
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", *cmd], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(open(log).readlines()[-15:])
        sys.exit(f"{' '.join(cmd[:2])} failed (exit {done.returncode}); see {log}:\n{tail}")
    return time.time() - start


def train(work: str, name: str, model: dict, init_from: str, steps: int, lr: float, a, **train) -> tuple[str, float]:
    """Train `name` with the trainer, export its last step; returns (the export's directory, wall seconds)."""
    cfg = {
        "model": model,
        "data": {"path": os.path.join(work, "data"), "seq_len": a.seq_len, "global_batch": a.batch},
        "optim": {"lr": lr, "weight_decay": 0.0},
        "schedule": {"warmup_steps": max(1, steps // 10)},
        "train": {"steps": steps, "eval_interval": 0, "init_from": init_from, "resume": "never", **train},
        "checkpoint": {"interval": steps},
        "logging": {
            "run_dir": os.path.join(work, name),
            "progress": False,
            "tensorboard": False,
            "plot": False,
            "interval": 5,
        },
    }
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    print(f"{name}: {steps} steps of {a.seq_len * a.batch} tokens ({path}) ...", flush=True)
    seconds = run(["lasp.train", "--config", path], os.path.join(work, f"{name}.log"))
    out = os.path.join(work, f"{name}-export")
    step = os.path.join(work, name, "checkpoints", f"step-{steps:08d}")
    seconds += run(
        ["lasp.export", "--checkpoint", step, "--out", out, "--force"], os.path.join(work, f"{name}-export.log")
    )
    return out, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", default="runs/smollm2-135m-hf", help="the converted model (made by smollm2_import.py)")
    p.add_argument("--work", default="runs/smollm2-linearise", help="data, runs, exports and results.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--window", type=int, default=64, help="the softmax window of the linear layers")
    p.add_argument(
        "--gate-normalizer",
        type=float,
        default=256.0,
        help="the key gate's logsigmoid is divided by it: larger, a slower decay at the start",
    )
    p.add_argument("--stage1-steps", type=int, default=150)
    p.add_argument("--stage2-steps", type=int, default=60)
    p.add_argument("--stage1-lr", type=float, default=3e-2)
    p.add_argument("--stage2-lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens of each perplexity")
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    from smollm2_import import convert

    from lasp.model import from_hf, from_pretrained
    from lasp.model.hf import source_config

    os.makedirs(a.work, exist_ok=True)
    if not os.path.isfile(os.path.join(a.hf, "config.json")):
        print(f"converting the GGUF model to {a.hf} ...", flush=True)
        convert(a.hf)
    files = sorted(
        f
        for pkg in TRAIN_TEXT
        for f in glob.glob(os.path.join(STDLIB, pkg, "**", "*.py"), recursive=True)
        if os.path.getsize(f) > 0
    )
    run(
        [
            "lasp.data",
            "prepare",
            "--input",
            *files,
            "--output",
            os.path.join(a.work, "data"),
            "--tokenizer",
            os.path.join(a.hf, "tokenizer.json"),
            "--force",
            "--quiet",
        ],
        os.path.join(a.work, "prepare.log"),
    )
    windows = held_out_windows(a.hf, a.seq_len, a.eval_tokens)
    print(
        f"training text: {len(files)} files of {', '.join(TRAIN_TEXT)}; held out: {windows.numel():,} tokens of "
        f"the json package in {len(windows)} windows of {a.seq_len + 1}",
        flush=True,
    )

    hybrid = {**dataclasses.asdict(source_config(a.hf)), **hybrid_fields(a.window, a.gate_normalizer)}
    results = {"setup": {k: getattr(a, k) for k in vars(a)}, "perplexity": {}, "seconds": {}, "tokens": {}}
    ppl = results["perplexity"]
    ppl["teacher (every layer softmax)"] = perplexity(from_hf(a.hf), windows)
    torch.manual_seed(0)
    converted = from_hf(a.hf, **hybrid_fields(a.window, a.gate_normalizer))
    ppl["hybrid, no training"] = perplexity(converted, windows)
    before = attention_errors(converted, windows)

    tokens = a.seq_len * a.batch
    s1, results["seconds"]["stage 1"] = train(
        a.work, "stage1", hybrid, a.hf, a.stage1_steps, a.stage1_lr, a, objective="attention_transfer", trainable="new"
    )
    results["tokens"]["stage 1"] = a.stage1_steps * tokens
    after_model = from_pretrained(s1)
    ppl["hybrid, after stage 1"] = perplexity(after_model, windows)
    after = attention_errors(after_model, windows)

    lora = {**hybrid, "lora_rank": a.lora_rank}
    s2, results["seconds"]["stage 2"] = train(
        a.work, "stage2", lora, s1, a.stage2_steps, a.stage2_lr, a, trainable="lora"
    )
    results["tokens"]["stage 2"] = a.stage2_steps * tokens
    ppl["hybrid, after stage 2"] = perplexity(from_pretrained(s2), windows)

    steps = a.stage1_steps + a.stage2_steps  # the same tokens as both stages
    base, results["seconds"]["baseline"] = train(
        a.work, "baseline", lora, a.hf, steps, a.stage2_lr, a, trainable="lora"
    )
    results["tokens"]["baseline"] = steps * tokens
    ppl["baseline: stage 2 only, same tokens"] = perplexity(from_pretrained(base), windows)

    results["attention_error"] = {
        "before": before,
        "after": after,
        "mean_before": sum(before) / len(before),
        "mean_after": sum(after) / len(after),
    }
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{'model':40s} {'perplexity':>12s}")
    for name, value in ppl.items():
        print(f"{name:40s} {value:12.2f}")
    e = results["attention_error"]
    print(
        f"attention error (mean over {len(before)} linear layers): {e['mean_before']:.3e} before stage 1, "
        f"{e['mean_after']:.3e} after ({e['mean_before'] / e['mean_after']:.1f}x lower)"
    )
    for name in results["seconds"]:
        print(f"{name}: {results['tokens'][name]:,} tokens in {results['seconds'][name]:.0f} s")
    print(f"results: {os.path.join(a.work, 'results.json')}")


if __name__ == "__main__":
    main()
