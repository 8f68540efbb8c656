"""python -m lasp.eval positions --checkpoint PATH [PATH ...] --data DIR --seq-len N [--rows R] [--split val]
    [--out FILE.jsonl] [--plot FILE.png] [--layout zigzag]

Loss by position (lasp.eval.positions): the mean next-token loss in log-spaced position buckets (1-64,
65-128, ..., up to N) over held-out rows of N tokens that lie inside one document, for each --checkpoint (a
trainer checkpoint, a LASP export or a Hugging Face directory). Under torchrun (`torchrun --nproc-per-node W
-m lasp.eval positions ...`) every row is split over the W ranks with LASP-2 / LASP-2H, so the evaluation
reaches the lengths training does. Writes one JSON line per checkpoint and bucket, and a plot of every
checkpoint on one figure.
"""

import argparse
import json
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lasp.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("positions", help="mean loss per log-spaced position bucket",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--checkpoint", required=True, nargs="+", help="trainer checkpoints, LASP exports or HF directories")
    q.add_argument("--data", required=True, help="a directory from python -m lasp.data prepare")
    q.add_argument("--split", default="val", help="the split to read (default: val, the held-out one)")
    q.add_argument("--seq-len", type=int, required=True, help="tokens per row (positions 1..N)")
    q.add_argument("--rows", type=int, default=16, help="at most this many rows (documents long enough)")
    q.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag", help="the SP layout")
    q.add_argument("--out", default=None, help="JSONL output (default: stdout only)")
    q.add_argument("--plot", default=None, help="a PNG of loss against position, every checkpoint")
    a = p.parse_args(argv)
    return q, a


def _problems(a, world: int) -> list[str]:
    """Every mistake in the arguments, before a model or the data is read."""
    from lasp.cli import at_least, existing, sequence, writable
    from lasp.train import ckpt_store

    problems = at_least("--seq-len", a.seq_len) + at_least("--rows", a.rows)
    from lasp.model.hf import is_hf_directory

    for path in a.checkpoint:
        what = None if is_hf_directory(path) else ckpt_store.describe(path, exports=True)
        if what is not None:
            problems.append(f"--checkpoint {path} {what}")
    problems += existing("--data", a.data, directory=True)
    if a.seq_len >= 1:
        problems += sequence("--seq-len", a.seq_len, a.layout, world)
    for option, path in (("--out", a.out), ("--plot", a.plot)):
        if path:
            problems += writable(option, path)
    return problems


def load(path: str, device: str = "cpu"):
    """A LinearLlama from a trainer checkpoint, a LASP export or a Hugging Face directory."""
    from lasp.model import LinearLlama
    from lasp.model.hf import is_hf_directory

    if is_hf_directory(path):
        return LinearLlama.from_hf(path, device=device)
    from lasp.generate import load_for_generation

    return load_for_generation(path, device)[0]


def _plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["checkpoint"] for r in records):
        mine = [r for r in records if r["checkpoint"] == name and r["tokens"]]
        ax.plot([(r["lo"] + r["hi"]) / 2 for r in mine], [r["loss"] for r in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (bucket centre)")
    ax.set_ylabel("mean next-token loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser, a = _parse(argv)
    import torch.distributed as dist

    from lasp.cli import usage_error

    world = int(os.environ.get("WORLD_SIZE", "1"))
    problems = _problems(a, world)
    rows = None
    if not problems:
        from lasp.data import TokenData
        from lasp.data.tokenizer import DataError
        from lasp.eval.positions import document_rows

        try:
            data = TokenData(a.data, a.split)
            rows = document_rows(data.tokens, data.doc_offsets, a.seq_len, a.rows)
        except DataError as e:
            problems.append(f"--data {a.data}: {e}")
        else:
            if len(rows) == 0:
                problems.append(f"--data {a.data}: no document of split {a.split!r} holds --seq-len + 1 = "
                                f"{a.seq_len + 1} tokens before its end: lower --seq-len")
    if problems:
        usage_error(parser, problems)
    group = None
    if world > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    from lasp.eval.positions import position_losses
    from lasp.parallel.sp import apply_sp

    records = []
    try:
        for path in a.checkpoint:
            model = load(path).eval()
            if group is not None:
                apply_sp(model, group, a.layout)
            for r in position_losses(model, rows, group=group, layout=a.layout):
                records.append({"checkpoint": path, "seq_len": a.seq_len, "rows": len(rows), **r})
    finally:
        if group is not None:
            dist.destroy_process_group()
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    lines = [json.dumps(r) for r in records]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if a.plot:
        _plot(records, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
