"""Triton kernels for chunked linear attention (GPU; on CPU only in Triton's interpreter). They know
nothing of the protocol: `triton_chunk.py` launches them as a `LinearAttnKernel`.

Legend: B batch, T tokens, H heads, K key dim, V value dim, BT tokens per chunk, NT chunks, BK / BV the
K / V tile of one program, lam = exp(g) the per-head decay.

Kernels tiled in the style of Lightning Attention-2 / flash-linear-attention:

    walk_fwd    grid (K tiles * V tiles, B*H): chunk by chunk from an initial state (or zero), the state
                entering each chunk (h) and the state after the last one. The forward's only
                sequential loop.
    chunk_out   grid (V tiles, NT, B*H): o = masked, decayed (q k^T) v + q h, one chunk per program;
                the same kernel, reversed, gives dv = (masked, decayed k q^T) do + k dh.
    walk_bwd    grid (K tiles * V tiles, B*H): chunks in reverse from the final state's gradient (or
                zero), the gradient of the state each chunk hands on (dh) and of the initial state.
                The backward runs both walks in one launch (walk_both), as they are independent.
    chunk_dqk   grid (K tiles, NT, B*H): dq = ds k + do h^T, dk = ds^T q + v dh^T, ds = masked (do v^T).

Products take the inputs' dtype (bf16 / fp16 on tensor cores; fp32 as three-pass TF32, tf32x3, which
keeps fp32 accuracy on tensor cores: exact IEEE products on FMA units spilled kilobytes of registers)
with fp32 accumulation; states are fp32 except the forward's per-chunk h of 16-bit inputs, kept in the input dtype
(as flash-linear-attention does) to halve its memory. A chunk that runs past T is masked, and decay
exponents use each chunk's true length, so the last, partial chunk needs no padding.

GATED (a scalar data-dependent gate, simple GLA / Mamba-2): instead of lam^(distance), every weight is exp of
a difference of the fp32 cumulative log-gate G [B, T, H] that `g` then points to (see `triton_chunk.py` for
the forms it comes in): exp(G_i - G_j) inside a chunk, exp(G_i) for a query against the chunk's incoming
state, exp(G_last - G_i) for a key to the chunk's end, exp(G_last) as the chunk's transition in the walks.
A cumulative gate never rises, so each exponent is <= 0; no weight is exp(-G) alone, which overflows.

On a GPU each
kernel's tiles, warps and stages are autotuned once per (K, V, chunk, flags), the walks also per B*H
(NBH: their only parallelism is tiles x B*H, so the best tile depends on it); LASP_TRITON_AUTOTUNE=0
takes one fixed config instead.
"""

import triton
import triton.language as tl

from lasp.kernels import settings


def _configs(tiles: list[tuple[int, int]], warps: tuple[int, ...], stages: tuple[int, ...]) -> list:
    """Every tile x warps x stages; the first is the fixed config (LASP_TRITON_AUTOTUNE=0), so it should
    be one that needs no register spills (`triton_aot --registers` shows them)."""
    if settings.TRITON_INTERPRET:  # small tiles, so the interpreter tests cross K and V tile borders
        return [triton.Config({"BK": 16, "BV": 16}, num_warps=1)]
    if not settings.TRITON_AUTOTUNE:
        tiles, warps, stages = tiles[:1], warps[:1], stages[:1]
    return [
        triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
        for bk, bv in tiles
        for w in warps
        for s in stages
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles wider than the head dims need (keep the narrowest if all are)."""
    args = {**named_args, **kwargs}
    k, v = (max(16, triton.next_power_of_2(args[d])) for d in ("K", "V"))
    kept = [c for c in configs if c.kwargs["BK"] <= k and c.kwargs["BV"] <= v]
    return kept or [min(configs, key=lambda c: c.kwargs["BK"] * c.kwargs["BV"])]


_WALK = dict(
    configs=_configs([(64, 64), (32, 64), (64, 32), (32, 32)], (4, 8), (2, 3)),
    key=["K", "V", "BT", "HAS_DECAY", "GATED", "DOT_PREC", "NBH"],
    prune_configs_by={"early_config_prune": _prune},
)
_CHUNK_CONFIGS = _configs([(64, 64), (128, 64), (64, 128), (128, 128)], (4, 8), (2, 3))


def _chunk_tuning(*flags: str) -> dict:
    return dict(
        configs=_CHUNK_CONFIGS,
        key=["K", "V", "BT", "HAS_DECAY", "GATED", "DOT_PREC", "INTRA", "PER_CHUNK", *flags],
        prune_configs_by={"early_config_prune": _prune},
    )


@triton.jit
def _rows(ptr, t, T, stride, c, C):
    """[len(t), len(c)] tile: rows t (row stride `stride`), columns c, zero outside T x C."""
    return tl.load(ptr + t[:, None] * stride + c[None, :], mask=(t[:, None] < T) & (c[None, :] < C), other=0.0)


@triton.jit
def _cols(ptr, t, T, stride, c, C):
    """The transposed tile of `_rows`: [len(c), len(t)]."""
    return tl.load(ptr + t[None, :] * stride + c[:, None], mask=(t[None, :] < T) & (c[:, None] < C), other=0.0)


@triton.jit
def _store_rows(ptr, x, t, T, stride, c, C):
    tl.store(
        ptr + t[:, None] * stride + c[None, :], x.to(ptr.dtype.element_ty), mask=(t[:, None] < T) & (c[None, :] < C)
    )


@triton.jit
def _powers(g, e, valid):
    """exp(g * e) where valid, else 0 (never exp of a large positive number times zero)."""
    return tl.where(valid, tl.exp(g * e.to(tl.float32)), 0.0)


@triton.jit
def _gate_weight(x, valid):
    """exp(x) where valid, else 0. x is a cumulative gate's difference, <= 0 wherever valid (a sum of gates
    <= 0 never rises, in floating point too); the clamp keeps the other entries (padding, the masked
    triangle) finite, so that zeros times them stay zeros."""
    return tl.where(valid, tl.exp(tl.minimum(x, 0.0)), 0.0)


@triton.jit
def _chunk_gates(gp, t, n, T, H: tl.constexpr, BT: tl.constexpr):
    """The cumulative gate of chunk n's tokens t (0 past T) and of its last token, from the head's row gp."""
    last = n * BT + tl.minimum(T - n * BT, BT) - 1
    return tl.load(gp + t * H, mask=t < T, other=0.0), tl.load(gp + last * H)


@triton.jit
def _state_ptr(base, rk, rv, V):
    return base + rk[:, None] * V + rv[None, :]


@triton.jit
def _walk_start(
    x,
    y,
    g,
    start,
    T,
    i_kv,
    bh,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_START: tl.constexpr,
):
    """The walks' prologue: this program's head of x [.., K] and y [.., V] and of the gate (GATED), its K
    and V tile and their mask, the head's log decay, and the state it starts from (`start`, or zero)."""
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    b, hh = bh // H, bh % H
    rk, rv = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    gh = tl.load(g + hh).to(tl.float32)  # g holds H zeros without decay: a tensor either way
    if HAS_START:
        state = tl.load(_state_ptr(start + bh * K * V, rk, rv, V), mask=m_kv, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    return x + (b * T * H + hh) * K, y + (b * T * H + hh) * V, g + (b * T * H + hh), rk, rv, m_kv, gh, state


@triton.jit
def _walk_fwd_body(
    k,
    v,
    g,
    h0,
    h,
    final,
    T,
    i_kv,
    bh,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    k, v, gp, rk, rv, m_kv, gh, state = _walk_start(k, v, g, h0, T, i_kv, bh, H, K, V, BK, BV, HAS_H0)
    i, NT = tl.arange(0, BT), tl.cdiv(T, BT)
    for n in range(NT):
        t = n * BT + i
        if STORE_H:
            tl.store(_state_ptr(h + (bh * NT + n) * K * V, rk, rv, V), state.to(h.dtype.element_ty), mask=m_kv)
        kt = _cols(k, t, T, H * K, rk, K)  # [BK, BT]
        vt = _rows(v, t, T, H * V, rv, V)  # [BT, BV]
        if GATED:
            gc, g_last = _chunk_gates(gp, t, n, T, H, BT)
            vt = (vt * _gate_weight(g_last - gc, t < T)[:, None]).to(vt.dtype)
            state = state * tl.exp(g_last)
        if HAS_DECAY:
            length = tl.minimum(T - n * BT, BT)
            vt = (vt * _powers(gh, length - 1 - i, i < length)[:, None]).to(vt.dtype)
            state = state * tl.exp(gh * length.to(tl.float32))
        state = tl.dot(kt, vt, state, input_precision=DOT_PREC)
    if STORE_FINAL:
        tl.store(_state_ptr(final + bh * K * V, rk, rv, V), state, mask=m_kv)


@triton.jit
def _walk_bwd_body(
    q,
    do,
    g,
    dht,
    dh,
    dfirst,
    scale,
    T,
    i_kv,
    bh,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    q, do, gp, rk, rv, m_kv, gh, carry = _walk_start(q, do, g, dht, T, i_kv, bh, H, K, V, BK, BV, HAS_DHT)
    i, NT = tl.arange(0, BT), tl.cdiv(T, BT)
    for m in range(NT):
        n = NT - 1 - m
        t = n * BT + i
        if STORE_H:
            tl.store(_state_ptr(dh + (bh * NT + n) * K * V, rk, rv, V), carry, mask=m_kv)
        qt = _cols(q, t, T, H * K, rk, K)  # [BK, BT]
        dot_ = _rows(do, t, T, H * V, rv, V)  # [BT, BV]
        if GATED:
            gc, g_last = _chunk_gates(gp, t, n, T, H, BT)
            qt = (qt * _gate_weight(gc, t < T)[None, :]).to(qt.dtype)
            carry = carry * tl.exp(g_last)
        if HAS_DECAY:
            qt = (qt * tl.exp(gh * (i + 1).to(tl.float32))[None, :]).to(qt.dtype)
            carry = carry * tl.exp(gh * tl.minimum(T - n * BT, BT).to(tl.float32))
        carry += tl.dot(qt, dot_, input_precision=DOT_PREC) * scale
    if STORE_FINAL:
        tl.store(_state_ptr(dfirst + bh * K * V, rk, rv, V), carry, mask=m_kv)


@triton.autotune(**_WALK)
@triton.jit(do_not_specialize=["T"])
def walk_fwd(
    k,
    v,
    g,
    h0,
    h,
    final,
    T,
    NBH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """From h0 (if HAS_H0, else zero): h[n] = state entering chunk n (if STORE_H); final = state after the
    last chunk (if STORE_FINAL)."""
    _walk_fwd_body(
        k,
        v,
        g,
        h0,
        h,
        final,
        T,
        tl.program_id(0),
        tl.program_id(1).to(tl.int64),
        H,
        K,
        V,
        BT,
        BK,
        BV,
        HAS_DECAY,
        GATED,
        HAS_H0,
        STORE_H,
        STORE_FINAL,
        DOT_PREC,
    )


@triton.autotune(**_WALK)
@triton.jit(do_not_specialize=["T"])
def walk_bwd(
    q,
    do,
    g,
    dht,
    dh,
    dfirst,
    scale,
    T,
    NBH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Chunks in reverse, from dht (the final state's gradient, if HAS_DHT): dh[n] = gradient of the state
    chunk n hands on (if STORE_H); dfirst = gradient of the state entering chunk 0 (if STORE_FINAL)."""
    _walk_bwd_body(
        q,
        do,
        g,
        dht,
        dh,
        dfirst,
        scale,
        T,
        tl.program_id(0),
        tl.program_id(1).to(tl.int64),
        H,
        K,
        V,
        BT,
        BK,
        BV,
        HAS_DECAY,
        GATED,
        HAS_DHT,
        STORE_H,
        STORE_FINAL,
        DOT_PREC,
    )


@triton.autotune(**_WALK)
@triton.jit(do_not_specialize=["T"])
def walk_both(
    k,
    v,
    q,
    do,
    g,
    h0,
    dht,
    h,
    dh,
    dh0,
    final,
    scale,
    T,
    NBH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The backward's two independent walks in one launch (grid axis 2: 0 = h, 1 = dh), so the sequential
    phase has twice the programs to spread over the GPU; the forward walk also stores the final state if
    STORE_FINAL (a gate's gradient needs it)."""
    i_kv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    if tl.program_id(2) == 0:
        _walk_fwd_body(
            k,
            v,
            g,
            h0,
            h,
            final,
            T,
            i_kv,
            bh,
            H,
            K,
            V,
            BT,
            BK,
            BV,
            HAS_DECAY,
            GATED,
            HAS_H0,
            True,
            STORE_FINAL,
            DOT_PREC,
        )
    else:
        _walk_bwd_body(
            q,
            do,
            g,
            dht,
            dh,
            dh0,
            scale,
            T,
            i_kv,
            bh,
            H,
            K,
            V,
            BT,
            BK,
            BV,
            HAS_DECAY,
            GATED,
            HAS_DHT,
            True,
            STORE_DH0,
            DOT_PREC,
        )


@triton.jit
def _span_powers(gh, t, i, T, BT: tl.constexpr, PER_CHUNK: tl.constexpr, FROM_END: tl.constexpr):
    """Decay of each token against its span (its chunk if PER_CHUNK, else the whole sequence):
    lam^(position + 1) for queries, lam^(span length - 1 - position) for keys (FROM_END)."""
    if PER_CHUNK:
        pos = i
        length = tl.minimum(T - (t - i), BT)
    else:
        pos = t
        length = T
    if FROM_END:
        w = _powers(gh, length - 1 - pos, pos < length)
    else:
        w = tl.exp(gh * (pos + 1).to(tl.float32))
    return w


@triton.jit
def _causal_powers(gh, i, HAS_DECAY: tl.constexpr, TRANSPOSED: tl.constexpr):
    """[BT, BT] weights of the intra-chunk scores: lam^(row - col) on and below the diagonal, else 0
    (TRANSPOSED: the same for scores laid out [key, query])."""
    if TRANSPOSED:
        r, c = i[None, :], i[:, None]
    else:
        r, c = i[:, None], i[None, :]
    if HAS_DECAY:
        w = _powers(gh, r - c, r >= c)
    else:
        w = tl.where(r >= c, 1.0, 0.0)
    return w


@triton.jit
def _span_gates(gp, gc, t, n, T, H: tl.constexpr, BT: tl.constexpr, PER_CHUNK: tl.constexpr, FROM_END: tl.constexpr):
    """`_span_powers` under a gate, from the head's row gp of the cumulative gate and its values gc at the
    tokens t: exp(G_t) for queries, exp(G_last - G_t) for keys (FROM_END), G_last the span's last token's."""
    if FROM_END:
        if PER_CHUNK:
            last = n * BT + tl.minimum(T - n * BT, BT) - 1
        else:
            last = T - 1
        w = _gate_weight(tl.load(gp + last * H) - gc, t < T)
    else:
        w = _gate_weight(gc, t < T)
    return w


@triton.jit
def _causal_gates(gc, i, TRANSPOSED: tl.constexpr):
    """`_causal_powers` under a gate: exp(G_row - G_col) on and below the diagonal, else 0."""
    if TRANSPOSED:
        w = _gate_weight(gc[None, :] - gc[:, None], i[None, :] >= i[:, None])
    else:
        w = _gate_weight(gc[:, None] - gc[None, :], i[:, None] >= i[None, :])
    return w


@triton.autotune(**_chunk_tuning("REVERSE"))
@triton.jit(do_not_specialize=["T"])
def chunk_out(
    a,
    b,
    c,
    g,
    S,
    out,
    state_scale,
    intra_scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    INTRA: tl.constexpr,
    PER_CHUNK: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """One chunk of out = state_scale * lam-weighted a S + intra_scale * (masked, decayed a b^T) c,
    with S the state of the chunk (PER_CHUNK) or one state for the whole sequence:

        forward  (a, b, c, S) = (q, k, v, h):  o, lam^(position + 1), causal mask;
        dv, REVERSE (a, b, c, S) = (k, q, do, dh): lam^(positions to the span's end), mask transposed.

    GATED: the gate's weights in place of lam's (`_span_gates`, `_causal_gates`).
    """
    i_v, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    bb, hh = bh // H, bh % H
    NT = tl.cdiv(T, BT)
    a += (bb * T * H + hh) * K
    b += (bb * T * H + hh) * K
    S += ((bh * NT + n) if PER_CHUNK else bh) * K * V
    i = tl.arange(0, BT)
    t, rv = n * BT + i, i_v * BV + tl.arange(0, BV)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        rk = i_k * BK + tl.arange(0, BK)
        at = _rows(a, t, T, H * K, rk, K)
        st = tl.load(_state_ptr(S, rk, rv, V), mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.0)
        acc = tl.dot(at, st.to(at.dtype), acc, input_precision=DOT_PREC)
        if INTRA:
            s = tl.dot(at, _cols(b, t, T, H * K, rk, K), s, input_precision=DOT_PREC)
    gh = tl.load(g + hh).to(tl.float32)
    if GATED:
        gp = g + (bb * T * H + hh)
        gc = tl.load(gp + t * H, mask=t < T, other=0.0)
        acc = acc * _span_gates(gp, gc, t, n, T, H, BT, PER_CHUNK, REVERSE)[:, None]
    if HAS_DECAY:
        acc = acc * _span_powers(gh, t, i, T, BT, PER_CHUNK, REVERSE)[:, None]
    acc = acc * state_scale
    if INTRA:
        ct = _rows(c + (bb * T * H + hh) * V, t, T, H * V, rv, V)
        if GATED:
            w = _causal_gates(gc, i, REVERSE)
        else:
            w = _causal_powers(gh, i, HAS_DECAY, REVERSE)
        s = s * w * intra_scale
        acc = tl.dot(s.to(ct.dtype), ct, acc, input_precision=DOT_PREC)
    _store_rows(out + (bb * T * H + hh) * V, acc, t, T, H * V, rv, V)


@triton.autotune(**_chunk_tuning("WANT_DQ", "WANT_DK"))
@triton.jit(do_not_specialize=["T"])
def chunk_dqk(
    q,
    k,
    v,
    g,
    h,
    dh,
    do,
    dq,
    dk,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    GATED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    INTRA: tl.constexpr,
    PER_CHUNK: tl.constexpr,
    WANT_DQ: tl.constexpr,
    WANT_DK: tl.constexpr,
):
    """dq = scale * (lam-weighted do h^T + ds k), dk = lam-weighted v dh^T + scale * ds^T q, with
    ds = masked, decayed (do v^T) when INTRA; h, dh per chunk (PER_CHUNK) or one for the sequence.
    GATED: the gate's weights in place of lam's."""
    i_k, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b, hh = bh // H, bh % H
    NT = tl.cdiv(T, BT)
    v += (b * T * H + hh) * V
    do += (b * T * H + hh) * V
    off = ((bh * NT + n) if PER_CHUNK else bh) * K * V
    i = tl.arange(0, BT)
    t, rk = n * BT + i, i_k * BK + tl.arange(0, BK)
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    ds = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        m_kv = (rk[None, :] < K) & (rv[:, None] < V)
        st = rk[None, :] * V + rv[:, None]  # [BV, BK]: a state tile, transposed
        if INTRA or WANT_DQ:
            dot_ = _rows(do, t, T, H * V, rv, V)
        if INTRA or WANT_DK:
            vt = _rows(v, t, T, H * V, rv, V)
        if INTRA:
            ds = tl.dot(dot_, tl.trans(vt), ds, input_precision=DOT_PREC)
        if WANT_DQ:
            hn = tl.load(h + off + st, mask=m_kv, other=0.0)
            dq_acc = tl.dot(dot_, hn.to(dot_.dtype), dq_acc, input_precision=DOT_PREC)
        if WANT_DK:
            dhn = tl.load(dh + off + st, mask=m_kv, other=0.0)
            dk_acc = tl.dot(vt, dhn.to(vt.dtype), dk_acc, input_precision=DOT_PREC)
    gh = tl.load(g + hh).to(tl.float32)
    if GATED:
        gp = g + (b * T * H + hh)
        gc = tl.load(gp + t * H, mask=t < T, other=0.0)
        if WANT_DQ:
            dq_acc = dq_acc * _span_gates(gp, gc, t, n, T, H, BT, PER_CHUNK, False)[:, None]
        if WANT_DK:
            dk_acc = dk_acc * _span_gates(gp, gc, t, n, T, H, BT, PER_CHUNK, True)[:, None]
    if HAS_DECAY:
        dq_acc = dq_acc * _span_powers(gh, t, i, T, BT, PER_CHUNK, False)[:, None]
        dk_acc = dk_acc * _span_powers(gh, t, i, T, BT, PER_CHUNK, True)[:, None]
    dq_acc = dq_acc * scale
    if INTRA:
        if GATED:
            w = _causal_gates(gc, i, False)
        else:
            w = _causal_powers(gh, i, HAS_DECAY, False)
        ds = ds * w * scale
        if WANT_DQ:
            kt = _rows(k + (b * T * H + hh) * K, t, T, H * K, rk, K)
            dq_acc = tl.dot(ds.to(kt.dtype), kt, dq_acc, input_precision=DOT_PREC)
        if WANT_DK:
            qt = _rows(q + (b * T * H + hh) * K, t, T, H * K, rk, K)
            dk_acc = tl.dot(tl.trans(ds.to(qt.dtype)), qt, dk_acc, input_precision=DOT_PREC)
    if WANT_DQ:
        _store_rows(dq + (b * T * H + hh) * K, dq_acc, t, T, H * K, rk, K)
    if WANT_DK:
        _store_rows(dk + (b * T * H + hh) * K, dk_acc, t, T, H * K, rk, K)
