"""Passkey retrieval (Landmark Attention, LongLoRA): a random 5-digit key hidden at a relative depth of
filler text, then a question; the model must answer the key (`python -m lasp.eval passkey`).

A prompt of `length` tokens is: the introduction, filler, the needle ("The pass key is 12345. Remember it.
12345 is the pass key.") placed so that `depth` of the filler comes before it, more filler, the question
("What is the pass key? The pass key is"). Keys, and so prompts, come from one seed: every model sees the
same tests.

Scoring is greedy decoding of the answer, computed in ONE forward: the prompt followed by the true answer
(" 12345"). Greedy decoding writes the key exactly when, at every answer position, the argmax given the
key's earlier digits is the next digit, which is what that forward's argmaxes show (teacher forcing). So
the whole test is one causal forward, which runs under sequence parallelism like any other: the padding
after the answer changes nothing before it.
"""

import math
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lasp.model.decode import forward_memory

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    """The prompt's token ids: exactly `length` of them."""
    answer: list[int]
    """The answer's ids (" 12345")."""
    key: str
    needle_at: int
    """The index of the needle's first token in `ids`."""


def keys(seed: int, trials: int) -> list[str]:
    """`trials` random 5-digit keys (10000-99999) drawn from `seed` alone."""
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(trials)]


def shortest(tokenizer, filler: str = FILLER) -> int:
    """The fewest tokens a prompt can have: the introduction, a needle and the question, no filler."""
    return sum(len(tokenizer.encode(t)) for t in (INTRO, NEEDLE.format(key="00000"), QUESTION))


def make_prompt(tokenizer, length: int, depth: float, key: str, filler: str = FILLER) -> Prompt:
    """The prompt of exactly `length` tokens with `key` at relative `depth` (0: right after the introduction,
    1: right before the question) of its filler. ValueError when `length` is below `shortest`."""
    intro, needle, question = (tokenizer.encode(t) for t in (INTRO, NEEDLE.format(key=key), QUESTION))
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"a passkey prompt needs at least {length - room} tokens, got a length of {length}")
    unit = tokenizer.encode(filler)
    hay = (unit * (room // max(len(unit), 1) + 1))[:room]
    cut = round(depth * room)
    ids = intro + hay[:cut] + needle + hay[cut:] + question
    return Prompt(ids, tokenizer.encode(ANSWER.format(key=key)), key, len(intro) + cut)


def memory_needed(cfg, dtype: torch.dtype, length: int, world: int = 1) -> int:
    """A lower bound on the bytes one rank's forward over a prompt of `length` tokens needs, the sequence split
    over `world` ranks (`forward_memory` of lasp.model.decode: the logits, vocab values a token, are most of it)."""
    return forward_memory(cfg, dtype, -(-length // world))


@torch.no_grad()
def answered(model, prompt: Prompt, *, group=None, layout: str = "zigzag") -> tuple[bool, list[int]]:
    """(whether greedy decoding answers the key, the argmax at each answer position given the true earlier
    digits). Under SP (`group` of W ranks, the model already parallelised over it) the sequence is padded
    after the answer to split evenly; every rank returns the same."""
    from lasp.sp.layout import SeqLayout, shard_sequence

    seq = prompt.ids + prompt.answer
    n = len(seq)
    world = 1 if group is None else dist.get_world_size(group)
    if world > 1:
        chunks = SeqLayout(layout, world).num_chunks
        n = math.ceil(len(seq) / chunks) * chunks
    tokens = torch.tensor(seq + [seq[-1]] * (n - len(seq)))[None]
    positions = torch.arange(n)[None]
    device = next(model.parameters()).device
    first = len(prompt.ids) - 1  # the position whose prediction is the answer's first token
    where = torch.arange(first, first + len(prompt.answer))
    if world == 1:
        picks = model(tokens.to(device), positions.to(device))[0].argmax(-1).cpu()[where]
    else:
        rank = dist.get_rank(group)
        local = shard_sequence(positions, rank=rank, world_size=world, layout=layout)
        out = (
            model(shard_sequence(tokens, rank=rank, world_size=world, layout=layout).to(device), local.to(device))[0]
            .argmax(-1)
            .cpu()
        )
        picks = torch.zeros(n, dtype=torch.int64)
        picks[local[0]] = out
        dist.all_reduce(picks, group=group)  # each position is held by exactly one rank
        picks = picks[where]
    picks = picks.tolist()
    return picks == prompt.answer, picks


def passkey_accuracy(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    *,
    filler: str = FILLER,
    group=None,
    layout: str = "zigzag",
    say=lambda m: None,
) -> list[dict]:
    """Accuracy per (length, depth) over `trials` keys: [{"length", "depth", "accuracy", "trials",
    "answers"}], answers being the digits greedy decoding gave (teacher-forced: see the module doc)."""
    out = []
    for length in lengths:
        for depth in depths:
            right, answers = 0, []
            for key in keys(seed, trials):
                ok, picks = answered(
                    model, make_prompt(tokenizer, length, depth, key, filler), group=group, layout=layout
                )
                right += ok
                answers.append(tokenizer.decode(picks).strip())
            out.append(
                {"length": length, "depth": depth, "accuracy": right / trials, "trials": trials, "answers": answers}
            )
            say(f"length {length:>7,} depth {depth:.2f}: {right}/{trials}")
    return out
