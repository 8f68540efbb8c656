"""Loss by position: does the model use its context? (`python -m lasp.eval positions`, and the trainer's
train.eval_positions, which is why it lives below both).

Rows of N + 1 tokens are taken from the start of held-out documents long enough to hold them, so a row lies
inside one document and token t of a row is at position t of its document. The mean next-token loss is
reported per log-spaced position bucket: 1-64, 65-128, 129-256, ..., up to N (positions counted from 1, the
first prediction at position 1). It should keep falling as the context grows.

Under sequence parallelism (W ranks of `group`) each rank holds its shard of every row (lasp.sp.layout), runs
the SP ops, and the per-bucket sums and counts are all-reduced: one all-reduce in all.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

FIRST = 64  # the first bucket: positions 1-64, then doubling


def buckets(n: int) -> list[tuple[int, int]]:
    """Log-spaced position buckets covering 1..n: (1, 64), (65, 128), (129, 256), ..., (.., n)."""
    out, lo, hi = [], 1, FIRST
    while lo <= n:
        out.append((lo, min(hi, n)))
        lo, hi = hi + 1, hi * 2
    return out


def document_rows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, max_rows: int) -> Tensor:
    """[R, seq_len + 1] int64: the first seq_len + 1 tokens of each document that has that many before its
    EOS, in order, at most `max_rows` of them (R may be 0)."""
    rows = []
    for d in range(len(offsets) - 1):
        start, end = int(offsets[d]), int(offsets[d + 1]) - 1  # end: the document's EOS
        if end - start >= seq_len + 1:
            rows.append(torch.from_numpy(np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)))
            if len(rows) == max_rows:
                break
    return torch.stack(rows) if rows else torch.empty(0, seq_len + 1, dtype=torch.int64)


def bucket_sums(losses: Tensor, positions: Tensor, edges: list[tuple[int, int]]) -> Tensor:
    """[2, buckets] float64: the summed loss and the token count of each bucket, from per-token losses and
    their 1-based positions (any shape, the same)."""
    out = torch.zeros(2, len(edges), dtype=torch.float64)
    for i, (lo, hi) in enumerate(edges):
        mine = (positions >= lo) & (positions <= hi)
        out[0, i] = losses[mine].double().sum()
        out[1, i] = mine.sum()
    return out


@torch.no_grad()
def position_losses(
    model, rows: Tensor, *, batch: int = 1, group=None, layout: str = "zigzag", device: torch.device | None = None
) -> list[dict]:
    """Mean loss per position bucket of `model` ((tokens, positions) -> logits) over `rows` [R, N + 1] (the
    same on every rank of `group`; the model already parallelised over it with lasp.parallel.sp.apply_sp
    when it has several ranks): [{"lo", "hi", "loss", "tokens"}]. `device`: the model's (default: its first
    parameter's)."""
    from lasp.sp.layout import shard_sequence

    n = rows.shape[1] - 1
    edges = buckets(n)
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    totals = torch.zeros(2, len(edges), dtype=torch.float64)
    device = device or next(model.parameters()).device
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        tokens, labels = part[:, :-1], part[:, 1:]
        positions = torch.arange(n).expand_as(tokens)
        if world > 1:
            tokens, labels, positions = (
                shard_sequence(x, rank=rank, world_size=world, layout=layout) for x in (tokens, labels, positions)
            )
        logits = model(tokens.to(device), positions.to(device)).cpu()
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        totals += bucket_sums(loss, positions + 1, edges)
    if world > 1:
        dist.all_reduce(totals, group=group)
    return [
        {"lo": lo, "hi": hi, "loss": float(s / c) if c else math.nan, "tokens": int(c)}
        for (lo, hi), s, c in zip(edges, totals[0], totals[1])
    ]
