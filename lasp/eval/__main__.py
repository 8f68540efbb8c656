"""python -m lasp.eval positions|passkey --checkpoint PATH [PATH ...] ...

Long-context evaluation of trainer checkpoints, LASP exports or Hugging Face directories, as one process or
under torchrun (`torchrun --nproc-per-node W -m lasp.eval ...`), where every sequence is split over the W
ranks with LASP-2 / LASP-2H, so the evaluation reaches the lengths training does.

  positions  the mean next-token loss in log-spaced position buckets (1-64, 65-128, ..., up to --seq-len)
             over held-out rows that lie inside one document (lasp.parallel.positions)
  passkey    a random 5-digit key hidden at relative depths of filler text at each length, then a question;
             accuracy of greedy decoding per (length, depth) (lasp.eval.passkey)

Both write one JSON line per checkpoint and measurement (stdout and --out) and a plot (--plot).
"""

import argparse
import json
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m lasp.eval",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, what in (
        ("positions", "mean loss per log-spaced position bucket"),
        ("passkey", "passkey retrieval accuracy per length and depth"),
    ):
        q = parsers[name] = sub.add_parser(name, help=what, description=what)
        q.add_argument(
            "--checkpoint",
            required=True,
            nargs="+",
            help="trainer checkpoints, LASP exports or Hugging Face directories",
        )
        q.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag", help="the SP layout")
        q.add_argument("--out", default=None, help="JSONL output (default: stdout only)")
        q.add_argument("--plot", default=None, help="a PNG of the results of every checkpoint")
    q = parsers["positions"]
    q.add_argument("--data", required=True, help="a directory from python -m lasp.data prepare")
    q.add_argument("--split", default="val", help="the split to read (default: val, the held-out one)")
    q.add_argument("--seq-len", type=int, required=True, help="tokens per row (positions 1..N)")
    q.add_argument("--rows", type=int, default=16, help="at most this many rows (documents long enough)")
    q = parsers["passkey"]
    q.add_argument("--lengths", required=True, help="prompt lengths in tokens, comma-separated: 1024,2048,...")
    q.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="relative depths of the key in [0, 1]")
    q.add_argument("--trials", type=int, default=5, help="keys per (length, depth)")
    q.add_argument("--seed", type=int, default=0, help="the seed of the keys: the same tests for every model")
    q.add_argument("--filler", default=None, help="the filler text, repeated (default: Landmark Attention's)")
    a = p.parse_args(argv)
    return parsers[a.command], a


def _numbers(option: str, text: str, kind) -> tuple[list, list[str]]:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return [], [f"{option} must be comma-separated numbers, got {text!r}"]
    return values, [] if values else [f"{option} is empty"]


def against_data(paths: list[str], data, option: str, lead: bool = True) -> list[str]:
    """Each model of `paths` against the tokenizer of `data` (a TokenData): the tokenizers they record agree
    and the data's ids fit the model's vocabulary; one line per problem, naming both sides. A model that
    records no tokenizer is compared by its vocabulary size only, which is said (on stderr, by `lead`)."""
    from lasp.data.tokenizer import tokenizer_problems
    from lasp.train.artifacts import recorded

    problems, tok = [], data.meta["tokenizer"]
    for path in paths:
        try:
            desc, vocab = recorded(path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            problems.append(f"--checkpoint {path}: cannot read its tokenizer or vocabulary ({e})")
            continue
        problems += tokenizer_problems(tok, desc, f"{option} {data.path}", f"--checkpoint {path}")
        if vocab < data.vocab_size:
            problems.append(
                f"--checkpoint {path} has a vocabulary of {vocab}, smaller than that of {option} "
                f"{data.path} ({data.vocab_size}, tokenizer {tok.get('name')!r}): prepare it with "
                "the model's tokenizer"
            )
        elif desc is None and lead:
            print(
                f"note: --checkpoint {path} records no tokenizer: only its vocabulary size ({vocab}) is "
                f"compared with the data's ({data.vocab_size}), not which tokenizer made the data",
                file=sys.stderr,
            )
    return problems


def fits(path: str, tok) -> list[str]:
    """The ids of `tok` (the tokenizer a model directory or checkpoint gives, `lasp.train.artifacts.tokenizer_of`)
    lie inside the model's vocabulary: a Hugging Face tokenizer may add an EOS past it."""
    from lasp.train.artifacts import recorded

    try:
        vocab = recorded(path)[1]
    except (ValueError, OSError, KeyError, TypeError) as e:
        return [f"--checkpoint {path}: cannot read its vocabulary size ({e})"]
    if tok.vocab_size <= vocab:
        return []
    return [
        f"--checkpoint {path}: its tokenizer {tok.name!r} has {tok.vocab_size} ids (EOS {tok.eos_id}), more than "
        f"the model's vocabulary of {vocab}"
    ]


def load(path: str, device: str = "cpu"):
    """A LinearLlama from a trainer checkpoint or a LASP export (in float32), or a Hugging Face directory
    (in its weights' dtype)."""
    import torch

    from lasp.train import artifacts

    dtype = None if artifacts.kind(path) == "hf" else torch.float32
    return artifacts.load(path, dtype=dtype, device=device)[0]


def _problems(a, world: int) -> tuple[list[str], dict]:
    """Every mistake in the arguments, before a model is read; and what was read to check them."""
    from lasp.cli import at_least, existing, sequence, writable
    from lasp.train import ckpt_store
    from lasp.train.artifacts import kind, tokenizer_of

    problems, found = [], {}
    for path in a.checkpoint:
        what = None if kind(path) is not None else ckpt_store.describe(path, exports=True)
        if what is not None:
            problems.append(f"--checkpoint {path} {what}")
        elif a.command == "passkey":
            try:
                found.setdefault("tokenizers", {})[path] = tokenizer_of(path)
            except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is the user's to fix
                problems.append(f"--checkpoint {path}: no tokenizer to write the prompts with ({e})")
    for option, path in (("--out", a.out), ("--plot", a.plot)):
        if path:
            problems += writable(option, path)
    if a.command == "positions":
        problems += at_least("--seq-len", a.seq_len) + at_least("--rows", a.rows)
        problems += existing("--data", a.data, directory=True)
        if a.seq_len >= 1:
            problems += sequence("--seq-len", a.seq_len, a.layout, world)
        return problems, found
    lengths, bad = _numbers("--lengths", a.lengths, int)
    depths, bad_depths = _numbers("--depths", a.depths, float)
    problems += bad + bad_depths + at_least("--trials", a.trials)
    problems += [f"--depths: {d} is outside [0, 1]" for d in depths if not 0 <= d <= 1]
    from lasp.eval.passkey import FILLER, shortest

    for path, tok in found.get("tokenizers", {}).items():
        low = shortest(tok)
        short = [n for n in lengths if n < low]
        if short:
            problems.append(
                f"--lengths {','.join(map(str, short))}: a prompt needs at least {low} tokens with "
                f"the tokenizer of {path}"
            )
        if not tok.encode(a.filler or FILLER):
            problems.append("--filler is empty once tokenized")
        problems += fits(path, tok)
    found.update(lengths=lengths, depths=depths)
    return problems, found


def _passkey_fits(model, tokenizer, lengths: list[int], world: int) -> list[str]:
    """The longest prompt and its answer within the model's positions, and one forward per process (the
    LOCAL_WORLD_SIZE processes of this node together) within the memory the CPU has available."""
    from lasp.cli import memory
    from lasp.eval.passkey import ANSWER, memory_needed
    from lasp.model.decode import check_positions

    longest, problems = max(lengths), []
    try:
        check_positions(
            model.cfg,
            longest + len(tokenizer.encode(ANSWER.format(key="00000"))),
            f"--lengths {longest} and the answer",
        )
    except ValueError as e:
        problems.append(str(e))
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    need = here * memory_needed(model.cfg, model.embed.weight.dtype, longest, world)
    shared = f" ({here} processes on this node share it)" if here > 1 else ""
    return problems + memory("--lengths", longest, need, "cpu", f"lower --lengths{shared}")


def _plot(records: list[dict], path: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["checkpoint"] for r in records))
    if command == "positions":
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            mine = [r for r in records if r["checkpoint"] == name and r["tokens"]]
            ax.plot([(r["lo"] + r["hi"]) / 2 for r in mine], [r["loss"] for r in mine], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the document (bucket centre)")
        ax.set_ylabel("mean next-token loss")
        ax.legend(fontsize=7)
    else:
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            mine = [r for r in records if r["checkpoint"] == name]
            lengths = sorted({r["length"] for r in mine})
            depths = sorted({r["depth"] for r in mine})
            grid = [
                [next(r["accuracy"] for r in mine if r["length"] == n and r["depth"] == d) for n in lengths]
                for d in depths
            ]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("depth of the key")
            ax.set_title(os.path.basename(os.path.normpath(name)), fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    parser, a = _parse(argv)
    import torch.distributed as dist

    from lasp.cli import usage_error

    world = int(os.environ.get("WORLD_SIZE", "1"))
    problems, found = _problems(a, world)
    rows = None
    if not problems and a.command == "positions":
        from lasp.data import TokenData
        from lasp.data.dataset import dataset_problems
        from lasp.parallel.positions import document_rows

        damaged = [f"--data {a.data}: {q}" for q in dataset_problems(a.data, [a.split])]  # sizes, checksums
        problems += damaged
        if not damaged:
            data = TokenData(a.data, a.split)
            problems += against_data(a.checkpoint, data, "--data", lead=int(os.environ.get("RANK", "0")) == 0)
            rows = document_rows(data.tokens, data.doc_offsets, a.seq_len, a.rows)
            if len(rows) == 0:
                problems.append(
                    f"--data {a.data}: no document of split {a.split!r} holds --seq-len + 1 = "
                    f"{a.seq_len + 1} tokens before its end: lower --seq-len"
                )
    usage_error(parser, problems)
    group = None
    if world > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    lead = int(os.environ.get("RANK", "0")) == 0
    from lasp.eval.passkey import FILLER, passkey_accuracy
    from lasp.parallel.positions import position_losses
    from lasp.parallel.sp import apply_sp

    records = []
    try:
        for path in a.checkpoint:
            model = load(path).eval()
            if a.command == "passkey":
                usage_error(parser, _passkey_fits(model, found["tokenizers"][path], found["lengths"], world))
            if group is not None:
                apply_sp(model, group, a.layout)
            if a.command == "positions":
                results = [
                    {"seq_len": a.seq_len, "rows": len(rows), **r}
                    for r in position_losses(model, rows, group=group, layout=a.layout)
                ]
            else:
                say = (lambda m, p=path: print(f"{p}: {m}", file=sys.stderr, flush=True)) if lead else (lambda m: None)
                results = passkey_accuracy(
                    model,
                    found["tokenizers"][path],
                    found["lengths"],
                    found["depths"],
                    a.trials,
                    a.seed,
                    filler=a.filler or FILLER,
                    group=group,
                    layout=a.layout,
                    say=say,
                )
            records += [{"checkpoint": path, **r} for r in results]
    finally:
        if group is not None:
            dist.destroy_process_group()
    if not lead:
        return 0
    lines = [json.dumps(r) for r in records]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if a.plot:
        _plot(records, a.plot, a.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
