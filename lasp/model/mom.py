"""Mixture-of-Memories (MoM, arXiv 2502.13685): a router sends each token to its top k of M memories, each memory
a linear-attention state of its own written only by its tokens (plus, optionally, a shared memory every token
writes), and the token's output mixes its memories' read-outs by the router's weights.

Here the memories are extra heads of the one core (docs/lasp2.md, "Mixture-of-Memories"): every head holds M
(+ 1 shared) memory heads, in (head, memory) order, and a token not routed to a memory is an identity step for
it: its key and value are zero (no write) and its log-gate 0 (no decay). Every routed token is kept (no
capacity), so the core, and every SP method, sees an ordinary linear form of M times the heads.

Legend: B batch, T tokens, H heads, M memories (the shared one included where there is one), D head dim.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Router(nn.Module):
    """x [B, T, hidden] -> (weights [B, T, M], routed [B, T, M] bool): softmax over the routed memories' logits,
    the top k kept and renormalised (flash-linear-attention's MomAttention), the shared memory (last) at weight 1.

    `grad_sum` (tensor parallelism): applied to the logits; the identity forward and the sum over the ranks'
    gradients backward, as each rank's gradient of the weights comes from its own heads only."""

    def __init__(self, hidden: int, memories: int, top_k: int, shared: bool):
        super().__init__()
        self.proj = nn.Linear(hidden, memories, bias=False)
        self.top_k, self.shared = top_k, shared
        self.copies = memories + int(shared)
        self.grad_sum = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.proj(x)
        if self.grad_sum is not None:
            logits = self.grad_sum(logits)
        scores = F.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        top, chosen = scores.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
        routed = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)
        if self.shared:
            weights = torch.cat([weights, weights.new_ones(*weights.shape[:-1], 1)], -1)
            routed = torch.cat([routed, routed.new_ones(*routed.shape[:-1], 1)], -1)
        return weights.to(x.dtype), routed


def run_memories(fn, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, route: tuple[Tensor, Tensor], **kw):
    """`fn` (linear_attn or an SP op) over the memory heads, mixed back by the router's weights.

    q [B, T, H, D]; k, v [B, T, Hkv * M, D] and the gate [B, T, H * M] or [B, T, H * M, D], (head, memory)
    order; `kw` passes beta ([B, T, H * M]) and the op's other arguments through. Returns o [B, T, H, Dv] (and
    the final state [B, H * M, D, Dv] with output_final_state)."""
    weights, routed = route
    B, T, H, _ = q.shape
    M = weights.shape[-1]
    keep = routed[:, :, None, :, None]  # [B, T, 1, M, 1]
    k, v = (
        x.unflatten(2, (-1, M)).repeat_interleave(H * M // x.shape[2], dim=2).masked_fill(~keep, 0).flatten(2, 3)
        for x in (k, v)
    )
    q = q[:, :, :, None].expand(B, T, H, M, q.shape[-1]).flatten(2, 3)
    if gate is not None:
        g = gate.unflatten(2, (H, M))
        gate = g.masked_fill(~(keep if g.dim() == 5 else keep[..., 0]), 0).flatten(2, 3)
    out = fn(q, k, v, gate=gate, **kw)
    o, final = out if kw.get("output_final_state") else (out, None)
    o = (o.unflatten(2, (H, M)) * weights[:, :, None, :, None].to(o.dtype)).sum(3)
    return o if final is None else (o, final)
