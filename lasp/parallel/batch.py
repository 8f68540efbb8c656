"""This rank's part of a global batch: its DP rows, its SP shard of the tokens (one layout for the whole
model, positions included), cut into microbatches."""

import torch
from torch import Tensor

from lasp.parallel.config import ParallelConfig
from lasp.parallel.groups import ParallelGroups
from lasp.sp.layout import shard_sequence


def local_microbatches(tokens: Tensor, cfg: ParallelConfig, groups: ParallelGroups) -> list[dict]:
    """tokens [B, N+1] (the same on every rank) -> microbatches of {tokens, positions, labels} [b, N/sp]."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    B, N = inputs.shape
    rows = slice(groups.dp_rank * B // cfg.dp, (groups.dp_rank + 1) * B // cfg.dp)
    positions = torch.arange(N, device=tokens.device).expand(B, N)
    parts = []
    for x in (inputs, positions, labels):
        x = x[rows]
        if cfg.sp > 1:
            x = shard_sequence(x, rank=groups.sp_rank, world_size=cfg.sp, layout=cfg.sp_layout)
        parts.append(x.chunk(cfg.microbatches, dim=0))
    return [{"tokens": t, "positions": p, "labels": l} for t, p, l in zip(*parts)]
