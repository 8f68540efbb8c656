"""DeltaProduct (arXiv 2502.10297) as the delta rule on an interleaved sequence (docs/lasp2.md, "DeltaProduct").

Each token t applies n delta-rule steps (n = `householder`), its gate once before them and its query once after:
S_t = Prod_j (I - b_tj k_tj k_tj^T) Diag(exp(g_t)) S_{t-1} + ..., o_t = s q_t^T S_t. Spread over n micro-steps
per token, that is the delta rule on a sequence n times as long: the gate at each token's first micro-step (0,
no decay, at the others), the query at its last (the outputs of the others dropped). k, v and beta come as
flash-linear-attention's chunk_gated_delta_product takes them, [B, T * n, ...], micro-step j of token t at row
t * n + j; q and the gate as [B, T, ...].

The interleaving is local to each token, so a shard of tokens is a shard of micro-steps on the same layout and
every SP method serves it unchanged; documents stretch by n.

Legend: B batch, T tokens, H heads, K key dim, n micro-steps (Householder factors) per token.
"""

import torch
from torch import Tensor

from lasp.kernels.checks import check_qkv, check_scale
from lasp.kernels.documents import as_documents


def check_householder(n, q: Tensor, k: Tensor, v: Tensor, beta, gate) -> None:
    """n >= 1; k, v and beta n times as long as q, the gate (if any) as long as q. Every problem at once."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"householder must be an int >= 1 (micro-steps per token), got {n!r}")
    check_qkv(q, k, v, same_length=False)
    problems = []
    if beta is None:
        problems.append("householder needs the delta rule: give beta [B, T * householder, H]")
    T = q.shape[1]
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] != T * n:
            problems.append(
                f"with householder={n}, {name} must hold T * {n} = {T * n} rows (q has T = {T}), got {tuple(x.shape)}"
            )
    if isinstance(gate, Tensor) and gate.dim() >= 2 and gate.shape[1] != T:
        problems.append(
            f"with householder={n}, the gate is one per token, T = {T} rows like q, got {tuple(gate.shape)}"
        )
    if problems:
        raise ValueError("; ".join(problems))


def interleave(q: Tensor, gate: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
    """q [B, T, H, K] and the gate ([B, T, H] or [B, T, H, K]) spread over n micro-steps per token: q at the
    last (zeros before), the gate at the first (0 after)."""
    B, T = q.shape[:2]
    qn = torch.cat([q.new_zeros(B, T, n - 1, *q.shape[2:]), q[:, :, None]], dim=2).flatten(1, 2)
    if gate is None:
        return qn, None
    gn = torch.cat([gate[:, :, None], gate.new_zeros(B, T, n - 1, *gate.shape[2:])], dim=2).flatten(1, 2)
    return qn, gn


def read_out(o: Tensor, n: int) -> Tensor:
    """The output [B, T * n, H, V] of the interleaved sequence -> each token's, [B, T, H, V]."""
    return o.unflatten(1, (-1, n))[:, :, -1]


def run_product(fn, q: Tensor, k: Tensor, v: Tensor, n: int, *, length: int, **kw):
    """`fn` (linear_attn, or an SP op on this rank's shard) with householder=n: checked, run on the interleaved
    sequence, read out per token. `length`: the tokens `cu_seqlens` spans (the global length under SP); `kw`
    holds fn's other arguments (beta, gate, scale, cu_seqlens, output_final_state, ...)."""
    check_householder(n, q, k, v, kw.get("beta"), kw.get("gate"))
    kw["scale"] = check_scale(kw.get("scale"), q.shape[-1])
    q, kw["gate"] = interleave(q, kw.get("gate"), n)
    if kw.get("cu_seqlens") is not None:
        kw["cu_seqlens"] = as_documents(kw["cu_seqlens"], q.shape[0], length).stretched(n)
    out = fn(q, k, v, **kw)
    return (read_out(out[0], n), out[1]) if kw.get("output_final_state") else read_out(out, n)
