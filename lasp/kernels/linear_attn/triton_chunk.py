"""Triton kernels for chunked linear attention behind the kernel protocol (GPU; on CPU only in Triton's
interpreter, TRITON_INTERPRET=1). `chunk.py` (PyTorch) is their reference, with the same methods.

Legend: B batch, T tokens, H heads, K key dim, V value dim, BT tokens per chunk, NT chunks.
Activations are [B, T, H, D] (any float dtype, float32 accumulation); states [B, H, K, V] float32.
K and V are each one block (<= 256, padded to a power of two >= 16). A chunk that runs past T is masked,
and decay exponents use each chunk's true length, so the last, partial chunk needs no padding.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HEAD_DIM = 256


@triton.jit
def _tile(ptr, t0, T, stride, D, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] float32 tile of rows t0.. (row stride `stride`) of a [T, D] slice, zero outside."""
    t = t0 + tl.arange(0, BT)
    d = tl.arange(0, BD)
    m = (t[:, None] < T) & (d[None, :] < D)
    return tl.load(ptr + t[:, None] * stride + d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _put(ptr, x, t0, T, stride, D, BT: tl.constexpr, BD: tl.constexpr):
    t = t0 + tl.arange(0, BT)
    d = tl.arange(0, BD)
    m = (t[:, None] < T) & (d[None, :] < D)
    tl.store(ptr + t[:, None] * stride + d[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _state_at(ptr, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers and mask of a [K, V] float32 state stored row-major at ptr."""
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    return ptr + rk[:, None] * V + rv[None, :], (rk[:, None] < K) & (rv[None, :] < V)


@triton.jit
def _powers(g, e, valid):
    """exp(g * e) where valid, else 0 (never exp of a large positive number times zero)."""
    return tl.where(valid, tl.exp(g * e.to(tl.float32)), 0.0)


@triton.jit
def _states_fwd(
    k, v, g, h, final, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DECAY: tl.constexpr, STORE_H: tl.constexpr,
):
    """Chunk by chunk: h[n] = state entering chunk n (if STORE_H); final = state after the last chunk."""
    bh = tl.program_id(0)
    b, hh = bh // H, bh % H
    kb = k + b * T * H * K + hh * K
    vb = v + b * T * H * V + hh * V
    gh = tl.load(g + hh).to(tl.float32) if HAS_DECAY else 0.0
    NT = tl.cdiv(T, BT)
    i = tl.arange(0, BT)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(NT):
        t0 = n * BT
        if STORE_H:
            hp, hm = _state_at(h + (bh * NT + n) * K * V, K, V, BK, BV)
            tl.store(hp, state, mask=hm)
        kt = _tile(kb, t0, T, H * K, K, BT, BK)
        vt = _tile(vb, t0, T, H * V, V, BT, BV)
        if HAS_DECAY:
            length = tl.minimum(T - t0, BT)
            kt = kt * _powers(gh, length - 1 - i, i < length)[:, None]
            state = state * tl.exp(gh * length.to(tl.float32))
        state += tl.dot(tl.trans(kt), vt)
    fp, fm = _state_at(final + bh * K * V, K, V, BK, BV)
    tl.store(fp, state, mask=fm)


@triton.jit
def _intra_o(
    q, k, v, g, h, o, scale, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
):
    """o of chunk n: masked, decayed (q k^T) v plus the incoming chunk state h[n] seen by q."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, hh = bh // H, bh % H
    NT = tl.cdiv(T, BT)
    t0 = n * BT
    qt = _tile(q + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
    kt = _tile(k + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
    vt = _tile(v + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV)
    i = tl.arange(0, BT)
    causal = i[:, None] >= i[None, :]
    s = tl.dot(qt, tl.trans(kt))
    hp, hm = _state_at(h + (bh * NT + n) * K * V, K, V, BK, BV)
    hn = tl.load(hp, mask=hm, other=0.0)
    if HAS_DECAY:
        gh = tl.load(g + hh).to(tl.float32)
        s = s * _powers(gh, i[:, None] - i[None, :], causal)
        qt = qt * tl.exp(gh * (i + 1).to(tl.float32))[:, None]
    else:
        s = tl.where(causal, s, 0.0)
    out = (tl.dot(s, vt) + tl.dot(qt, hn)) * scale
    _put(o + b * T * H * V + hh * V, out, t0, T, H * V, V, BT, BV)


@triton.jit
def _inter_o(q, S, g, o, scale, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             HAS_DECAY: tl.constexpr):
    """o_t = scale * lambda^(t+1) q_t S for the tokens of chunk n."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, hh = bh // H, bh % H
    t0 = n * BT
    qt = _tile(q + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
    if HAS_DECAY:
        gh = tl.load(g + hh).to(tl.float32)
        qt = qt * tl.exp(gh * (t0 + tl.arange(0, BT) + 1).to(tl.float32))[:, None]
    sp, sm = _state_at(S + bh * K * V, K, V, BK, BV)
    out = tl.dot(qt, tl.load(sp, mask=sm, other=0.0)) * scale
    _put(o + b * T * H * V + hh * V, out, t0, T, H * V, V, BT, BV)


@triton.jit
def _inter_dq(do, S, g, dq, scale, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              HAS_DECAY: tl.constexpr):
    """dq_t = scale * lambda^(t+1) do_t S^T."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, hh = bh // H, bh % H
    t0 = n * BT
    dot_ = _tile(do + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV)
    sp, sm = _state_at(S + bh * K * V, K, V, BK, BV)
    out = tl.dot(dot_, tl.trans(tl.load(sp, mask=sm, other=0.0))) * scale
    if HAS_DECAY:
        gh = tl.load(g + hh).to(tl.float32)
        out = out * tl.exp(gh * (t0 + tl.arange(0, BT) + 1).to(tl.float32))[:, None]
    _put(dq + b * T * H * K + hh * K, out, t0, T, H * K, K, BT, BK)


@triton.jit
def _inter_ds(q, do, g, dS, scale, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              HAS_DECAY: tl.constexpr):
    """dS = scale * sum_t lambda^(t+1) q_t do_t^T (gradient of the incoming state)."""
    bh = tl.program_id(0)
    b, hh = bh // H, bh % H
    gh = tl.load(g + hh).to(tl.float32) if HAS_DECAY else 0.0
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(tl.cdiv(T, BT)):
        t0 = n * BT
        qt = _tile(q + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
        if HAS_DECAY:
            qt = qt * tl.exp(gh * (t0 + tl.arange(0, BT) + 1).to(tl.float32))[:, None]
        acc += tl.dot(tl.trans(qt), _tile(do + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV))
    sp, sm = _state_at(dS + bh * K * V, K, V, BK, BV)
    tl.store(sp, acc * scale, mask=sm)


@triton.jit
def _state_bwd(k, v, g, dM, dk, dv, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               HAS_DECAY: tl.constexpr):
    """Gradient of M = sum_t lambda^(T-1-t) k_t v_t^T: dk_t = w_t v_t dM^T, dv_t = w_t k_t dM."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, hh = bh // H, bh % H
    t0 = n * BT
    kt = _tile(k + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
    vt = _tile(v + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV)
    mp, mm = _state_at(dM + bh * K * V, K, V, BK, BV)
    dm = tl.load(mp, mask=mm, other=0.0)
    dkt = tl.dot(vt, tl.trans(dm))
    if HAS_DECAY:
        t = t0 + tl.arange(0, BT)
        w = _powers(tl.load(g + hh).to(tl.float32), T - 1 - t, t < T)[:, None]
        dkt = dkt * w
        kt = kt * w
    _put(dk + b * T * H * K + hh * K, dkt, t0, T, H * K, K, BT, BK)
    _put(dv + b * T * H * V + hh * V, tl.dot(kt, dm), t0, T, H * V, V, BT, BV)


@triton.jit
def _dstates_bwd(q, do, g, dkv, scale, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 HAS_DECAY: tl.constexpr):
    """Chunks in reverse: dkv[n] = gradient of the state chunk n hands on (from later chunks' queries)."""
    bh = tl.program_id(0)
    b, hh = bh // H, bh % H
    gh = tl.load(g + hh).to(tl.float32) if HAS_DECAY else 0.0
    NT = tl.cdiv(T, BT)
    i = tl.arange(0, BT)
    carry = tl.zeros([BK, BV], dtype=tl.float32)
    for m in range(NT):
        n = NT - 1 - m
        t0 = n * BT
        dp, dmask = _state_at(dkv + (bh * NT + n) * K * V, K, V, BK, BV)
        tl.store(dp, carry, mask=dmask)
        qt = _tile(q + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
        dot_ = _tile(do + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV)
        if HAS_DECAY:
            length = tl.minimum(T - t0, BT)
            qt = qt * tl.exp(gh * (i + 1).to(tl.float32))[:, None]
            carry = carry * tl.exp(gh * length.to(tl.float32))
        carry += tl.dot(tl.trans(qt), dot_) * scale


@triton.jit
def _intra_dqkv(
    q, k, v, g, h, dkv, do, dq, dk, dv, scale, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_DECAY: tl.constexpr,
):
    """dq, dk, dv of chunk n from its own tokens, its incoming state h[n] and its outgoing gradient dkv[n]."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, hh = bh // H, bh % H
    NT = tl.cdiv(T, BT)
    t0 = n * BT
    qt = _tile(q + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
    kt = _tile(k + b * T * H * K + hh * K, t0, T, H * K, K, BT, BK)
    vt = _tile(v + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV)
    dot_ = _tile(do + b * T * H * V + hh * V, t0, T, H * V, V, BT, BV) * scale
    hp, hm = _state_at(h + (bh * NT + n) * K * V, K, V, BK, BV)
    hn = tl.load(hp, mask=hm, other=0.0)
    gp, gm = _state_at(dkv + (bh * NT + n) * K * V, K, V, BK, BV)
    dkvn = tl.load(gp, mask=gm, other=0.0)
    i = tl.arange(0, BT)
    causal = i[:, None] >= i[None, :]
    s = tl.dot(qt, tl.trans(kt))
    ds = tl.dot(dot_, tl.trans(vt))
    if HAS_DECAY:
        gh = tl.load(g + hh).to(tl.float32)
        length = tl.minimum(T - t0, BT)
        dec = _powers(gh, i[:, None] - i[None, :], causal)
        s, ds = s * dec, ds * dec
        qdec = tl.exp(gh * (i + 1).to(tl.float32))[:, None]
        kdec = _powers(gh, length - 1 - i, i < length)[:, None]
    else:
        s, ds = tl.where(causal, s, 0.0), tl.where(causal, ds, 0.0)
        qdec, kdec = 1.0, 1.0
    dqt = tl.dot(ds, kt) + tl.dot(dot_, tl.trans(hn)) * qdec
    dkt = tl.dot(tl.trans(ds), qt) + tl.dot(vt, tl.trans(dkvn)) * kdec
    dvt = tl.dot(tl.trans(s), dot_) + tl.dot(kt * kdec, dkvn)
    _put(dq + b * T * H * K + hh * K, dqt, t0, T, H * K, K, BT, BK)
    _put(dk + b * T * H * K + hh * K, dkt, t0, T, H * K, K, BT, BK)
    _put(dv + b * T * H * V + hh * V, dvt, t0, T, H * V, V, BT, BV)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class TritonChunkKernel:
    """`LinearAttnKernel` in Triton: chunks of `block` tokens (a power of two >= 16)."""

    name = "triton"

    def __init__(self, block: int = 64):
        if block < 16 or block & (block - 1):
            raise ValueError(f"Triton chunk size must be a power of two >= 16, got {block}")
        self.block = block

    def _setup(self, q_or_k: Tensor, v: Tensor, log_decay: Tensor | None):
        B, T, H, K = q_or_k.shape
        V = v.shape[-1]
        if max(K, V) > MAX_HEAD_DIM:
            raise ValueError(f"Triton kernels take head dims up to {MAX_HEAD_DIM}, got K={K}, V={V}")
        g = (torch.zeros(1, device=v.device) if log_decay is None else log_decay.float().contiguous())
        meta = dict(BT=self.block, BK=_block(K), BV=_block(V), HAS_DECAY=log_decay is not None)
        return B, T, H, K, V, triton.cdiv(T, self.block), g, meta

    def chunk_decay(self, log_decay: Tensor | None, length: int) -> Tensor | None:
        return None if log_decay is None else torch.exp(log_decay.to(torch.float64) * length)

    def chunk_state(self, k, v, log_decay):
        B, T, H, K, V, NT, g, meta = self._setup(k, v, log_decay)
        final = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
        _states_fwd[(B * H,)](k.contiguous(), v.contiguous(), g, final, final, T, H, K, V, STORE_H=False, **meta)
        return final

    def chunk_state_bwd(self, k, v, log_decay, dstate):
        B, T, H, K, V, NT, g, meta = self._setup(k, v, log_decay)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dm = dstate.float().contiguous()
        _state_bwd[(NT, B * H)](k.contiguous(), v.contiguous(), g, dm, dk, dv, T, H, K, V, **meta)
        return dk, dv

    def inter_fwd(self, q, state, log_decay, scale):
        B, T, H, K, V, NT, g, meta = self._setup(q, state, log_decay)
        o = q.new_empty(B, T, H, V)
        _inter_o[(NT, B * H)](q.contiguous(), state.float().contiguous(), g, o, scale, T, H, K, V, **meta)
        return o

    def inter_bwd(self, q, state, log_decay, scale, do):
        B, T, H, K, V, NT, g, meta = self._setup(q, state, log_decay)
        q, do = q.contiguous(), do.contiguous()
        dq = torch.empty_like(q)
        ds = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        _inter_dq[(NT, B * H)](do, state.float().contiguous(), g, dq, scale, T, H, K, V, **meta)
        _inter_ds[(B * H,)](q, do, g, ds, scale, T, H, K, V, **meta)
        return dq, ds

    def _chunk_starts(self, k, v, g, meta, B, T, H, K, V, NT) -> Tensor:
        h = torch.empty(B, H, NT, K, V, device=k.device, dtype=torch.float32)
        scratch = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
        _states_fwd[(B * H,)](k, v, g, h, scratch, T, H, K, V, STORE_H=True, **meta)
        return h

    def intra_fwd(self, q, k, v, log_decay, scale):
        B, T, H, K, V, NT, g, meta = self._setup(q, v, log_decay)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = self._chunk_starts(k, v, g, meta, B, T, H, K, V, NT)
        o = torch.empty_like(v)
        _intra_o[(NT, B * H)](q, k, v, g, h, o, scale, T, H, K, V, **meta)
        return o

    def intra_bwd(self, q, k, v, log_decay, scale, do):
        B, T, H, K, V, NT, g, meta = self._setup(q, v, log_decay)
        q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
        h = self._chunk_starts(k, v, g, meta, B, T, H, K, V, NT)
        dkv = torch.empty_like(h)
        _dstates_bwd[(B * H,)](q, do, g, dkv, scale, T, H, K, V, **meta)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _intra_dqkv[(NT, B * H)](q, k, v, g, h, dkv, do, dq, dk, dv, scale, T, H, K, V, **meta)
        return dq, dk, dv
