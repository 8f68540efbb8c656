"""This rank's part of a global batch: its DP rows, its SP shard of the tokens (one layout for the whole
model, positions included), cut into microbatches."""

import torch
from torch import Tensor

from lasp.kernels.documents import Documents
from lasp.parallel.config import ParallelConfig
from lasp.parallel.groups import ParallelGroups
from lasp.sp.layout import shard_sequence


def local_microbatches(
    tokens: Tensor, cfg: ParallelConfig, groups: ParallelGroups, eos_id: int | None = None
) -> list[dict]:
    """tokens [B, N+1] (the same on every rank) -> microbatches of {tokens, positions, labels} [b, N/sp].
    `eos_id`: packed documents (as lasp.data.local_microbatches): each microbatch also holds `documents`
    (its rows' global starts, after every EOS) and positions restart at every start."""
    B, N = tokens.shape[0], tokens.shape[1] - 1
    rows = slice(groups.dp_rank * B // cfg.dp, (groups.dp_rank + 1) * B // cfg.dp)
    inputs, labels = tokens[rows, :-1], tokens[rows, 1:]
    positions = torch.arange(N, device=tokens.device).expand(inputs.shape[0], N)
    docs = None
    if eos_id is not None:
        docs = [Documents.from_eos(x, eos_id) for x in inputs.chunk(cfg.microbatches, dim=0)]
        positions = torch.cat([d.positions(tokens.device) for d in docs])
    parts = []
    for x in (inputs, positions, labels):
        if cfg.sp > 1:
            x = shard_sequence(x, rank=groups.sp_rank, world_size=cfg.sp, layout=cfg.sp_layout)
        parts.append(x.chunk(cfg.microbatches, dim=0))
    out = [{"tokens": t, "positions": p, "labels": y} for t, p, y in zip(*parts)]
    for mb, d in zip(out, docs or []):
        mb["documents"] = d
    return out
