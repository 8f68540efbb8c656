"""Generate text from a trained Linear-Llama on one device.

    python -m lasp.generate --checkpoint DIR --prompt TEXT [--max-new-tokens 200] [--temperature 0.8]
        [--top-p 0.95] [--seed S] [--device auto|cpu|cuda] [--dtype float32|bfloat16]

DIR is an export directory (model.safetensors + config.json, from `save_pretrained` / lasp.export) or a
trainer checkpoint directory, consolidated into one single-device state dict (lasp.train.artifacts), or a Hugging
Face directory.
The prompt and the generated text go to stdout as they come; a summary (tokens, tokens/s, bytes of
decoding state) goes to stderr. Linear layers decode with a fixed-size state, softmax layers with a KV cache.
"""

import argparse
import sys
import time

import torch

from lasp.cli import at_least, memory
from lasp.model.decode import DecodeState, decode_memory, forward_memory, generate
from lasp.train.artifacts import load

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
        model, tok = load(args.checkpoint, dtype=DTYPES[args.dtype], device=device)
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
