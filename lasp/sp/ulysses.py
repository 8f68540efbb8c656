"""DeepSpeed-Ulysses: all-to-all from sequence-split to head-split, attend on whole sequences, and back.

Legend: B batch, T local tokens, N = W*T global tokens, H heads, h = H / W heads per rank.

q, k, v each go through one all-to-all ([B, T, H, D] on every rank -> [B, N, h, D]), the single-device op
runs on the whole sequence for this rank's heads, and one all-to-all brings the output back: 4 per layer
forward, 4 backward (autograd of the all-to-all is the same all-to-all). Heads must divide by W; k/v heads
that do not (GQA with few KV heads) are repeated up to the query heads first.
"""

from collections.abc import Callable

from torch import Tensor

from lasp.distributed import all_to_all_stack, group_rank
from lasp.kernels import linear_attn
from lasp.kernels.softmax_attn import softmax_attn
from lasp.sp.dispatch import LinearForm, run_sp_linear_attn, run_sp_softmax_attn
from lasp.sp.layout import SeqLayout, global_to_stacked, stacked_to_global


def _seq_to_heads(x_BTHD: Tensor, lay: SeqLayout, group) -> Tensor:
    B, T, H, D = x_BTHD.shape
    W = lay.world_size
    pieces = x_BTHD.reshape(B, T, W, H // W, D).permute(2, 0, 1, 3, 4)  # piece j: head group j
    return stacked_to_global(all_to_all_stack(pieces, group), lay)


def _heads_to_seq(x_BNhD: Tensor, lay: SeqLayout, group) -> Tensor:
    back = all_to_all_stack(global_to_stacked(x_BNhD, lay), group)  # piece j: my tokens, head group j
    W, B, T, h, D = back.shape
    return back.permute(1, 2, 0, 3, 4).reshape(B, T, W * h, D)


def _run(op: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, lay: SeqLayout, group, **kwargs) -> Tensor:
    if k.shape[2] % lay.world_size:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    qh, kh, vh = (_seq_to_heads(x, lay, group) for x in (q, k, v))
    return _heads_to_seq(op(qh, kh, vh, **kwargs), lay, group)


def ulysses_softmax_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
    check_ranks: bool = True,
    cu_seqlens=None,
) -> Tensor:
    """Ulysses softmax attention over `group`; same contract as `ring_softmax_attn`, plus Hq % W == 0.
    With `cu_seqlens` each rank attends its heads over the whole sequence with the global documents."""
    return run_sp_softmax_attn(
        lambda q, k, v, lay, group, causal, scale, fp, docs: _run(
            softmax_attn, q, k, v, lay, group, causal=causal, scale=scale, cu_seqlens=docs
        ),
        q,
        k,
        v,
        op="ulysses",
        group=group,
        layout=layout,
        causal=causal,
        scale=scale,
        check_ranks=check_ranks,
        heads_divisible=True,
        cu_seqlens=cu_seqlens,
    )


def _linear(q, k, v, form: LinearForm, scale, group, lay: SeqLayout, kernel, fp) -> Tensor:
    """Every form: a gate [B, T, H, Kg] and beta [B, T, H] go to heads with q (one more all-to-all each way
    for each); a constant decay is sliced to this rank's heads."""
    h, r = q.shape[2] // lay.world_size, group_rank(group)
    decay = None if form.log_decay is None else form.log_decay[r * h : (r + 1) * h]
    gate = None if form.gate is None else _seq_to_heads(form.gate, lay, group)
    gate = gate[..., 0] if gate is not None and gate.shape[-1] == 1 else gate  # the op's scalar form
    beta = None if form.beta is None else _seq_to_heads(form.beta[..., None], lay, group)[..., 0]
    return _run(
        lambda q, k, v: linear_attn(
            q, k, v, log_decay=decay, gate=gate, beta=beta, causal=form.causal, scale=scale, kernel=kernel
        ),
        q,
        k,
        v,
        lay,
        group,
    )


def ulysses_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "contiguous",
    log_decay: Tensor | None = None,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    check_ranks: bool = True,
    cu_seqlens=None,
) -> Tensor:
    """Ulysses linear attention over `group`; same contract as `lasp1_linear_attn`, plus H % W == 0. A
    `gate` goes to heads with q: one more all-to-all each way; so does `beta` (the delta rule)."""
    return run_sp_linear_attn(
        _linear,
        q,
        k,
        v,
        op="ulysses-linear",
        group=group,
        layout=layout,
        log_decay=log_decay,
        causal=causal,
        scale=scale,
        kernel=None,
        check_ranks=check_ranks,
        heads_divisible=True,
        gate=gate,
        cu_seqlens=cu_seqlens,
        beta=beta,
        supports=frozenset({"gate", "beta"}),
    )
