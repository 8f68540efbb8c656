"""Generate text from a trained Linear-Llama on one device.

    python -m lasp.generate --checkpoint DIR --prompt TEXT [--max-new-tokens 200] [--temperature 0.8]
        [--top-p 0.95] [--seed S] [--device auto|cpu|cuda] [--dtype float32|bfloat16]

DIR is an export directory (model.safetensors + config.json, from `save_pretrained` / lasp.export) or a
trainer checkpoint directory, consolidated into one single-device state dict by `lasp.export.consolidate`.
The prompt and the generated text go to stdout as they come; a summary (tokens, tokens/s, bytes of
decoding state) goes to stderr. Linear layers decode with a fixed-size state, softmax layers with a KV cache.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from lasp.cli import at_least, memory
from lasp.data.tokenizer import ByteTokenizer, DataError, load_tokenizer
from lasp.model.decode import DecodeState, decode_memory, forward_memory, generate
from lasp.model.pretrained import CONFIG, TOKENIZER, WEIGHTS, from_pretrained, model_from_state_dict, read_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tokenizer_from_description(desc: dict | None, local_file: Path | None = None, source: str = "checkpoint"):
    """The tokenizer a model was trained with, from its `describe()` dict: "byte" -> ByteTokenizer;
    otherwise `local_file` (a copied tokenizer.json) when it exists, else the recorded path. A recorded
    sha256 must match the file found."""
    if not desc:
        raise DataError(f"{source} records no tokenizer: cannot turn text into ids")
    if desc.get("name") == "byte":
        return ByteTokenizer()
    path = local_file if local_file is not None and local_file.is_file() else desc.get("path")
    if not path:
        raise DataError(f"{source}: tokenizer {desc.get('name')!r} has no tokenizer.json beside it and no path")
    tok = load_tokenizer(str(path))
    if desc.get("sha256") and tok.sha256 != desc["sha256"]:
        raise DataError(
            f"{source}: tokenizer file {str(path)!r} is not the one the model was trained with "
            f"(sha256 {tok.sha256[:12]}..., recorded {desc['sha256'][:12]}...)"
        )
    return tok


def load_tokenizer_for(directory: str | Path):
    """The tokenizer recorded in an export directory's config.json (its tokenizer.json copy if any)."""
    directory = Path(directory)
    return tokenizer_from_description(
        read_config(directory)["tokenizer"], directory / TOKENIZER, str(directory / CONFIG)
    )


class UsageError(ValueError):
    """A --checkpoint that is neither an export directory nor a readable trainer checkpoint."""


def load_for_generation(checkpoint: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an export directory or a trainer checkpoint directory."""
    d = Path(checkpoint)
    if not d.is_dir():
        raise UsageError(f"--checkpoint {str(d)!r} is not a directory")
    if (d / WEIGHTS).is_file() or (d / CONFIG).is_file():
        return from_pretrained(d, dtype=dtype, device=device), load_tokenizer_for(d)
    from lasp.export import consolidate
    from lasp.train.ckpt_store import CheckpointError

    try:
        cfg, state_dict, tok_desc = consolidate(str(d))
    except CheckpointError as e:
        raise UsageError(
            f"{d} is neither an export directory (no {WEIGHTS}) nor a usable trainer checkpoint: {e}"
        ) from e
    model = model_from_state_dict(cfg, state_dict, str(d), device, dtype)
    return model, tokenizer_from_description(tok_desc, None, str(d))


class _Stream:
    """Writes decoded text as it becomes final: a suffix is held back while it ends in a broken character
    (a partial UTF-8 sequence) or while decoding more ids rewrote what was already written."""

    def __init__(self, tokenizer, out):
        self.tok, self.out, self.ids, self.written = tokenizer, out, [], ""

    def add(self, token_id: int | None, final: bool = False) -> None:
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.startswith(self.written) and (final or not text.endswith("\ufffd")):
            self.out.write(text[len(self.written) :])
            self.out.flush()
            self.written = text


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lasp.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="export directory or trainer checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    return p.parse_args(argv)


def _problems(args) -> list[str]:
    """Every mistake in the arguments, before any weight is read."""
    from lasp.train import ckpt_store

    problems = []
    what = ckpt_store.describe(args.checkpoint, exports=True)
    if what is not None:
        problems.append(f"--checkpoint {args.checkpoint} {what}")
    problems += at_least("--max-new-tokens", args.max_new_tokens)
    if not 0 <= args.temperature < float("inf"):
        problems.append(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda, but no CUDA GPU is visible")
    return problems


def main(argv=None) -> int:
    args = _parse(argv)
    problems = _problems(args)
    if problems:
        print(f"error: {len(problems)} problem(s):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model, tok = load_for_generation(args.checkpoint, device, DTYPES[args.dtype])
        prompt = tok.encode(args.prompt)
        held = len(prompt) + args.max_new_tokens  # the KV caches are allocated for all of them at once
        need = forward_memory(model.cfg, model.embed.weight.dtype, len(prompt), logits_tokens=1, held_tokens=held)
        problems = memory(
            "--max-new-tokens",
            args.max_new_tokens,
            need,
            device,
            f"lower it or shorten the prompt ({len(prompt):,} tokens)"
            + (", or use --dtype bfloat16" if args.dtype == "float32" else ""),
        )
        if problems:
            print(f"error: {problems[0]}", file=sys.stderr)
            return 2
        gen = torch.Generator(device=device)
        if args.seed is None:
            gen.seed()
        else:
            gen.manual_seed(args.seed)
        state = DecodeState.empty(model, 1, capacity=len(prompt) + args.max_new_tokens)
        steps = generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            generator=gen,
            eos_id=tok.eos_id,
            state=state,
        )
    except (ValueError, OSError) as e:  # UsageError, DataError and PretrainedError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    stream, n = _Stream(tok, sys.stdout), 0
    t0 = t_first = time.perf_counter()
    for ids in steps:
        token = int(ids[0])
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if token == tok.eos_id:
            break
        stream.add(token)
    stream.add(None, final=True)
    sys.stdout.write("\n")
    t_end = time.perf_counter()
    mem = decode_memory(model.cfg, model.embed.weight.dtype)
    rate = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else float("nan")
    print(
        f"generated {n} tokens (prompt {len(prompt)}, prefill + first token {t_first - t0:.3f}s, then "
        f"{rate:.1f} tokens/s on {device}); decode state {mem.at(state.position)} bytes at {state.position} "
        f"tokens = {mem.fixed_bytes} fixed + {mem.per_token_bytes} per token",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
