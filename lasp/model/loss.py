"""LM head + next-token cross-entropy, chunked over tokens so that logits never exist for the whole sequence.

Legend: N tokens (B*T flattened), D hidden, V vocabulary rows held here (all of them, or a TP shard).

The plain path (`lm_head` then `lm_loss_sum`) keeps [N, V] logits, their float32 copy and their
log-softmax alive until the backward: at 64K tokens and a 128K vocabulary that is tens of GiB. Here the
forward computes the logits `chunk_tokens` tokens at a time and keeps only the per-token logsumexp; the
backward recomputes each chunk's logits (one more matmul, the price of the memory) and turns them into
that chunk's share of dhidden and dweight. Peak extra memory: one [chunk_tokens, V] buffer.

A vocabulary split over ranks (TP) uses the same code: the caller passes the offset of its rows and two
callbacks that all-reduce (max, sum) over its group; they run once per call, not once per chunk.
"""

from collections.abc import Callable

import torch
from torch import Tensor

IGNORE = -100


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _spans(n: int, chunk_tokens: int):
    step = chunk_tokens if chunk_tokens > 0 else max(n, 1)
    return ((a, min(a + step, n)) for a in range(0, n, step))


def _no_autocast(fn):
    """Run fn with autocast off: under bf16 autocast its fp32 matmuls would silently become bf16 ones
    (and the backward's fp32 buffers would meet bf16 products)."""

    def run(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)

    return run


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, labels, chunk_tokens, vocab_start, reduce_max, reduce_sum):
        dt = _compute_dtype(hidden, weight)
        h, y, w = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), weight.to(dt)
        N, V = h.shape[0], w.shape[0]
        local = y - vocab_start
        mine = (local >= 0) & (local < V)
        idx = local.clamp(0, V - 1)[:, None]
        m, s, t = (torch.empty(N, dtype=dt, device=h.device) for _ in range(3))
        for a, b in _spans(N, chunk_tokens):
            z = h[a:b].to(dt) @ w.T  # [n, V], the only large buffer
            t[a:b] = z.gather(1, idx[a:b]).squeeze(1)
            m[a:b] = z.amax(1)
            s[a:b] = z.sub_(m[a:b, None]).exp_().sum(1)  # in place: no second [n, V] buffer
            del z  # before the next chunk's buffer exists, not after
        t = torch.where(mine, t, 0)
        if reduce_max is not None:  # other ranks hold other vocabulary rows: combine their partial sums
            g = reduce_max(m.clone())
            s = s * torch.exp(m - g)
            m = g
        if reduce_sum is not None:
            s, t = reduce_sum(torch.stack([s, t])).unbind(0)  # one collective for both
        lse = m + torch.log(s)
        ctx.chunk_tokens, ctx.vocab_start = chunk_tokens, vocab_start
        ctx.save_for_backward(hidden, weight, labels, lse)
        return torch.where(y != IGNORE, lse - t, 0).sum()

    @staticmethod
    @_no_autocast
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        dt = lse.dtype
        h, y, w = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), weight.to(dt)
        V = w.shape[0]
        local = y - ctx.vocab_start
        hit = ((local >= 0) & (local < V)).to(dt)[:, None]
        idx = local.clamp(0, V - 1)[:, None]
        scale = torch.where(y != IGNORE, grad.to(dt), 0)[:, None]
        need_h, need_w = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(w) if need_w else None
        for a, b in _spans(h.shape[0], ctx.chunk_tokens):
            hc = h[a:b].to(dt)
            p = (hc @ w.T).sub_(lse[a:b, None]).exp_()  # softmax over the whole vocabulary, our columns
            p.scatter_add_(1, idx[a:b], -hit[a:b])  # minus the one-hot target (when it is one of ours)
            p.mul_(scale[a:b])
            if need_h:
                dh[a:b] = p @ w
            if need_w:
                dw.addmm_(p.T, hc)
            del p
        dh = dh.view_as(hidden) if need_h else None
        dw = dw.to(weight.dtype) if need_w else None
        return dh, dw, None, None, None, None, None


def chunked_lm_loss_sum(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_tokens: int,
    vocab_start: int = 0,
    reduce_max: Callable[[Tensor], Tensor] | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Summed next-token cross-entropy of the logits hidden @ weight.T, without keeping them.

    hidden [B, T, D], weight [V_local, D] (vocabulary rows vocab_start .. vocab_start + V_local - 1),
    labels [B, T] (already shifted; -100 is ignored) -> scalar, in float32 (float64 for float64 inputs)
    whatever the input dtype. `chunk_tokens` tokens are computed at a time (0: all at once).
    With a vocabulary split over ranks, `reduce_max(x)` and `reduce_sum(x)` return x all-reduced (max,
    sum) over them; every rank then returns the same loss, and dhidden is this rank's partial sum.
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    return _ChunkedLMLoss.apply(hidden, weight, labels, chunk_tokens, vocab_start, reduce_max, reduce_sum)


class _ChunkedKL(torch.autograd.Function):
    """KL(teacher || model) per token of the logits hidden @ weight.T (teacher: teacher_hidden @ weight.T,
    no gradient), chunked over tokens like _ChunkedLMLoss. Per token, with z the model's logits, y the
    teacher's, S_y = sum exp(y - m_y): KL = sum p_y (y - z) - lse_y + lse_z = (b - a) / S_y + lse_z - lse_y,
    a = sum exp(y - m_y) z, b = sum exp(y - m_y) y. Its gradient in z is p_z - p_y."""

    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, teacher, weight, mask, chunk_tokens, reduce_max, reduce_sum):
        dt = _compute_dtype(hidden, weight)
        h, t, w = hidden.reshape(-1, hidden.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), weight.to(dt)
        N = h.shape[0]
        mz, sz, my, sy, a, b = (torch.empty(N, dtype=dt, device=h.device) for _ in range(6))
        for lo, hi in _spans(N, chunk_tokens):
            z, y = h[lo:hi].to(dt) @ w.T, t[lo:hi].to(dt) @ w.T
            mz[lo:hi], my[lo:hi] = z.amax(1), y.amax(1)
            py = (y - my[lo:hi, None]).exp_()
            sy[lo:hi], a[lo:hi], b[lo:hi] = py.sum(1), (py * z).sum(1), (py * y).sum(1)
            sz[lo:hi] = z.sub_(mz[lo:hi, None]).exp_().sum(1)
            del z, y, py
        if reduce_max is not None:  # other ranks hold other vocabulary rows
            gz, gy = reduce_max(torch.stack([mz, my])).unbind(0)
            sz, (sy, a, b) = sz * torch.exp(mz - gz), (x * torch.exp(my - gy) for x in (sy, a, b))
            mz, my = gz, gy
        if reduce_sum is not None:
            sz, sy, a, b = reduce_sum(torch.stack([sz, sy, a, b])).unbind(0)
        lse_z, lse_y = mz + torch.log(sz), my + torch.log(sy)
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(hidden, teacher, weight, mask, lse_z, lse_y)
        return torch.where(mask.reshape(-1), (b - a) / sy + lse_z - lse_y, 0).sum()

    @staticmethod
    @_no_autocast
    def backward(ctx, grad):
        hidden, teacher, weight, mask, lse_z, lse_y = ctx.saved_tensors
        dt = lse_z.dtype
        h, t, w = hidden.reshape(-1, hidden.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), weight.to(dt)
        scale = torch.where(mask.reshape(-1), grad.to(dt), 0)[:, None]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(w) if need_w else None
        for lo, hi in _spans(h.shape[0], ctx.chunk_tokens):
            hc = h[lo:hi].to(dt)
            p = (hc @ w.T).sub_(lse_z[lo:hi, None]).exp_()
            p.sub_((t[lo:hi].to(dt) @ w.T).sub_(lse_y[lo:hi, None]).exp_()).mul_(scale[lo:hi])
            if need_h:
                dh[lo:hi] = p @ w
            if need_w:
                dw.addmm_(p.T, hc)
            del p
        return (
            dh.view_as(hidden) if need_h else None,
            None,
            dw.to(weight.dtype) if need_w else None,
            None,
            None,
            None,
            None,
        )


def chunked_kl_sum(
    hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_tokens: int,
    reduce_max: Callable[[Tensor], Tensor] | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Summed KL(teacher || model) over the tokens whose label is not -100, of the logits hidden @ weight.T
    against teacher_hidden @ weight.T (the teacher gets no gradient), `chunk_tokens` tokens at a time;
    a vocabulary split over ranks as in `chunked_lm_loss_sum` (weight: this rank's rows)."""
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    return _ChunkedKL.apply(
        hidden, teacher_hidden.detach(), weight, labels != IGNORE, chunk_tokens, reduce_max, reduce_sum
    )
