"""`python -m lasp.data prepare --input FILES_OR_GLOBS ... --output DIR [--tokenizer byte|tokenizer.json]`"""

import argparse
import os
import sys
from pathlib import Path

from lasp.cli import at_least, new_directory, usage_error
from lasp.data.dataset import OWN, dataset_files
from lasp.data.prepare import expand_inputs, own_inputs, prepare
from lasp.data.tokenizer import DataError


def summary(meta: dict, output: str) -> str:
    """A few lines for the terminal: tokenizer, and documents and tokens per split."""
    tok = meta["tokenizer"]
    lines = [f"prepared {output} ({tok['name']} tokenizer, vocab {tok['vocab_size']}, {meta['dtype']})"]
    for name, s in meta["splits"].items():
        lines.append(f"  {name}: {s['documents']:,} documents, {s['tokens']:,} tokens -> {s['file']}")
    if "val" not in meta["splits"]:
        lines.append("  val: none, as --val-fraction is 0: no documents held out, so training will not evaluate")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lasp.data", description="Data tools of LASP.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="tokenize text / JSONL files into a directory of packed tokens",
        description='Tokenize text files (one document each) and JSONL files (one {"text": ...} per line) '
        "into DIR/train.bin (and DIR/val.bin), document offsets and DIR/meta.json.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH_OR_GLOB",
        help="files or globs (a quoted glob is expanded here, sorted); *.jsonl files are JSONL",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="the directory to create")
    p.add_argument(
        "--tokenizer", default="byte", help="`byte` (UTF-8 bytes + EOS, vocab 257) or a Hugging Face tokenizer.json"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.0, metavar="F", help="fraction of the documents that go to val"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of val documents")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DIR when it is a dataset prepare made (once the new one is complete); anything else is refused",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(parser=p)  # for usage errors
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad inputs, with the problems on stderr). Bad numbers and an
    output that cannot be written are usage errors (SystemExit 2) before any input is read."""
    args = build_parser().parse_args(argv)
    # the new directory is built beside DIR and renamed into place: DIR's parent must take it
    output = Path(os.path.abspath(args.output))
    files, missing = expand_inputs(args.input)
    problems = new_directory("--output", output, args.force, dataset_files, OWN, own_inputs(files, args.tokenizer))
    problems += at_least("--seed", args.seed, low=0)
    if not 0 <= args.val_fraction < 1:
        problems.append(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if problems:  # with the inputs that are missing or no file (cheap: nothing is read), all at once
        problems += [f"--input {p}" for p in missing]
    usage_error(args.parser, problems)
    try:
        meta = prepare(
            args.input,
            args.output,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(meta, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
