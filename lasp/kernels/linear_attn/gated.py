"""Gated linear attention, chunked and vectorised in PyTorch: the CPU path and the ground truth for gates.

Legend: B batch, T tokens, H heads, K key dim, V value dim, n blocks, C block size, Kg gate width (1 for a
scalar gate per token and head, K for a vector gate over the key dim).

With a log-gate g_t <= 0 per token and head (scalar: simple GLA, Mamba-2) or per key dim (vector: GLA):

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T ,   o_t = scale * q_t^T S_t      (docs/design.md, "The math")

Inside a block, G_i = g_0 + ... + g_i (float32, or float64 for float64 inputs), measured from the block's
start; G never decreases in magnitude away from the start, so exp(G_i - G_j) <= 1 for i >= j and the
block's pieces are all bounded:
- intra-block scores A_ij = sum_k q_ik k_jk exp(G_ik - G_jk), j <= i: for a scalar gate a [C, C] weight
  per head. For a vector gate, (q_i exp(G_i)) . (k_j exp(-G_j)) by a matmul while the gate sums to no
  less than -FACTOR_SPAN over every block of the call (exp(30) neither overflows nor loses the product);
  otherwise the exact [C, C, K] weight over short blocks (16 tokens);
- the incoming state's term (q_i * exp(G_i)) H_b, and the block's state from a zero start
  sum_j (k_j * exp(G_last - G_j)) v_j^T, and its transition Diag(exp(G_last)).
Never exp(-G) alone, which overflows over a long span. Across blocks the states are scanned (`affine_scan`).

A log-gate of -inf (a gate of exactly 0) is a document start: the state resets there (`split_resets`).
Its gate counts as 0 in G, and a segment id per token masks the intra-block weight to one document,
drops the incoming state's term after a start, and keeps only the block's last document in its state.

The backward is written out. The gate's gradient needs no derivative of the exponentials: with q~ = q
exp(G) and k~ = k exp(-G), the output depends on G only through q~ and k~ and the final state through
Diag(exp(G_last)), so dG_t = q_t * dq_t - k_t * dk_t, dg is its reverse cumulative sum over the sequence,
and the final state adds sum_v dS_final * S_final to every token's dg (`gate_grad`).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from lasp.kernels.linear_attn.blocks import FACTOR_SPAN, VECTOR_BLOCK, Blocks
from lasp.kernels.protocol import state_dtype
from lasp.kernels.scan import affine_scan


def as_vector_form(gate: Tensor) -> Tensor:
    """[B, T, H] (scalar) or [B, T, H, K] (vector) -> [B, T, H, Kg]."""
    return gate.unsqueeze(-1) if gate.dim() == 3 else gate


def _causal_mask(C: int, device) -> Tensor:
    idx = torch.arange(C, device=device)
    return idx[:, None] >= idx[None, :]


class _Block:
    """One segment of blocks: q, k, v, the cumulative gate, and every weight the forward and backward use.

    The intra-block weight exp(G_i - G_j) comes in one of three forms: a [C, C] matrix per head (scalar
    gate); for a vector gate either factored, (q_i * exp(G_i)) . (k_j * exp(-G_j)), which is exact while
    the gate sums to no less than -FACTOR_SPAN over a block (nothing over- or underflows), or else the
    exact [C, C, K] weight over short blocks."""

    def __init__(self, bl: Blocks, s: slice, q, k, v, gate, factored: bool, resets: Tensor | None = None):
        self.q, self.k, self.v = bl.get(q, s), bl.get(k, s), bl.get(v, s)  # [n, B, H, C, D]
        self.G = bl.get(gate, s).cumsum(-2)  # [n, B, H, C, Kg]
        last = self.G[..., -1:, :]
        self.wk = torch.exp(last - self.G)  # decay of key i to the block's end
        self.decay = torch.exp(last).transpose(-1, -2)  # [n, B, H, Kg, 1]: the block's transition (rows)
        self.seg = None
        if resets is not None:  # document starts: segment ids from the block's start, [n, B, H, C, 1]
            self.seg = bl.get(resets[..., None], s).cumsum(-2)
            seg_last = self.seg[..., -1:, :]
            self.wk = self.wk * (self.seg == seg_last)  # only the last document reaches the block's end
            self.decay = self.decay * (seg_last == 0)
        self.mode = "scalar" if self.G.shape[-1] == 1 else "factored" if factored else "exact"
        self._E = self._qd = self._qf = self._kf = self._emG = self._eG = self._wq = None

    @property
    def eG(self) -> Tensor:
        """exp(G) (computed when first asked: the backward's walk over the states never needs it)."""
        if self._eG is None:
            self._eG = torch.exp(self.G)
        return self._eG

    @property
    def wq(self) -> Tensor:
        """Decay of the incoming state seen by query i: exp(G_i), zero after a document start."""
        if self._wq is None:
            self._wq = self.eG if self.seg is None else self.eG * (self.seg == 0)
        return self._wq

    def qd(self) -> Tensor:
        """q * exp(G), zero after a document start: the queries as the incoming state sees them."""
        if self._qd is None:
            self._qd = self.q * self.wq
        return self._qd

    def factors(self) -> tuple[Tensor, Tensor]:
        """(q * exp(G), k * exp(-G)): the factored form's operands (bounded by exp(FACTOR_SPAN))."""
        if self._kf is None:
            self._qf = self.qd() if self.seg is None else self.q * self.eG
            self._emG = torch.exp(-self.G)
            self._kf = self.k * self._emG
        return self._qf, self._kf

    def _mask(self) -> Tensor:
        """Causal, and (with document starts) within one document: [C, C] or [n, B, H, C, C]."""
        causal = _causal_mask(self.G.shape[-2], self.G.device)
        if self.seg is None:
            return causal
        seg = self.seg[..., 0]
        return causal & (seg[..., :, None] == seg[..., None, :])

    @property
    def E(self) -> Tensor:
        """The masked intra-block weight: [n, B, H, C, C] (scalar), [.., C, C, K] (exact) or the mask (factored)."""
        if self._E is None:
            G, mask = self.G, self._mask()
            neg = torch.full((), -torch.inf, dtype=G.dtype)
            if self.mode == "scalar":
                g = G[..., 0]
                self._E = torch.exp(torch.where(mask, g[..., :, None] - g[..., None, :], neg))
            elif self.mode == "exact":
                diff = G[..., :, None, :] - G[..., None, :, :]  # [n, B, H, C, C, K]
                self._E = torch.exp(torch.where(mask[..., None], diff, neg))
            else:
                self._E = mask.to(G.dtype)
        return self._E

    def scores(self) -> Tensor:
        """A [n, B, H, C, C]: masked, gated q k^T."""
        if self.mode == "exact":
            return ((self.q[..., :, None, :] * self.E) * self.k[..., None, :, :]).sum(-1)
        if self.mode == "factored":
            qf, kf = self.factors()
            return (qf @ kf.transpose(-1, -2)) * self.E
        return (self.q @ self.k.transpose(-1, -2)) * self.E

    def scores_bwd(self, da: Tensor) -> tuple[Tensor, Tensor]:
        """(dq, dk) of `scores` given its gradient da [n, B, H, C, C]."""
        if self.mode == "exact":
            dae = da[..., None] * self.E  # [n, B, H, C, C, K]
            return (dae * self.k[..., None, :, :]).sum(-2), (dae * self.q[..., :, None, :]).sum(-3)
        dae = da * self.E
        if self.mode == "factored":
            qf, kf = self.factors()
            return (dae @ kf) * self.eG, (dae.transpose(-1, -2) @ qf) * self._emG
        return dae @ self.k, dae.transpose(-1, -2) @ self.q

    def state(self) -> Tensor:
        """The blocks' states from a zero start [n, B, H, K, V]."""
        return (self.k * self.wk).transpose(-1, -2) @ self.v


def _cumsum_over_t(x: Tensor, C: int = 64) -> Tensor:
    """x.cumsum(1) for x [B, T, ...], by blocks of C tokens and a scan of the blocks' totals: twice as fast
    on a CPU as a cumsum over a strided dim of thousands of tokens."""
    B, T = x.shape[:2]
    if T <= C:
        return x.cumsum(1)
    pad = (-T) % C
    z = F.pad(x.flatten(2), (0, 0, 0, pad)).view(B, (T + pad) // C, C, -1).cumsum(2)
    total = z[:, :, -1:]
    z = z + (total.cumsum(1) - total)
    return z.flatten(1, 2)[:, :T].view(x.shape)


def split_resets(gate: Tensor) -> tuple[Tensor, Tensor | None]:
    """A log-gate with document starts (-inf: a gate of exactly 0, on every key dim of a vector gate) ->
    (the gate with 0 there, the starts [B, T, H] bool), or (gate, None) when it has none."""
    resets = torch.isneginf(gate[..., 0])
    if not bool(resets.any()):
        return gate, None
    return gate.masked_fill(resets[..., None], 0.0), resets


def _factorable(gate: Tensor, C: int) -> bool:
    """Whether the gate sums to no less than -FACTOR_SPAN over every block of C tokens, as `Blocks` lays them
    out (front-padded with zeros): inside a block |G| never exceeds its total, so exp(-G) <= exp(30)."""
    B, T = gate.shape[:2]
    g = gate.to(torch.float64 if gate.dtype == torch.float64 else torch.float32)
    g = F.pad(g.flatten(2), (0, 0, (-T) % C, 0))  # [B, n*C, H*Kg]
    return bool(g.view(B, -1, C, g.shape[-1]).sum(2).min() >= -FACTOR_SPAN)


def _blocks(T: int, gate: Tensor, dtype: torch.dtype, block: int, segment_blocks: int) -> tuple[Blocks, bool]:
    """The blocks of a call and whether a vector gate is factored in them."""
    factored = gate.shape[-1] > 1 and _factorable(gate, min(block, T))
    C = min(block, VECTOR_BLOCK) if gate.shape[-1] > 1 and not factored else block
    return Blocks(T, min(C, T), segment_blocks, state_dtype(dtype)), factored


def gated_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    scale: float,
    initial_state: Tensor | None,
    want_final: bool,
    block: int = 64,
    segment_blocks: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Causal gated attention over T (heads expanded; gate [B, T, H, Kg]) from `initial_state` (None:
    zero) -> (o [B, T, H, V] in q's dtype, final state [B, H, K, V] in the state dtype, or None).
    Blocks of `block` tokens (at most VECTOR_BLOCK for a vector gate), `segment_blocks` at a time."""
    gate, resets = split_resets(gate)
    bl, factored = _blocks(q.shape[1], gate, q.dtype, block, segment_blocks)
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    carry = None if initial_state is None else initial_state.to(bl.dtype)
    for s in bl.segments:
        b = _Block(bl, s, q, k, v, gate, factored, resets)
        h, carry = affine_scan(b.decay, b.state(), initial=carry)
        bl.put(o, s, (b.scores() @ b.v + b.qd() @ h) * scale)
    return o, carry if want_final else None


def gated_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    scale: float,
    initial_state: Tensor | None,
    do: Tensor,
    dfinal: Tensor | None,
    block: int = 64,
    segment_blocks: int = 16,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dgate [B, T, H, Kg], d initial_state or None) of `gated_fwd`, given do and the final
    state's gradient (or None). A gate of -inf is a document start (`split_resets`); its gradient is 0."""
    full_gate = gate
    gate, resets = split_resets(gate)
    bl, factored = _blocks(q.shape[1], gate, q.dtype, block, segment_blocks)
    carry = None if initial_state is None else initial_state.to(bl.dtype)
    incoming = []
    for s in bl.segments:  # the state entering every block
        b = _Block(bl, s, q, k, v, gate, factored, resets)
        h, carry = affine_scan(b.decay, b.state(), initial=carry)
        incoming.append(h)
    final = carry
    dq, dk, dv = (torch.empty(x.shape, dtype=bl.dtype, device=x.device) for x in (q, k, v))
    carry = None if dfinal is None else dfinal.to(bl.dtype)
    for s, h in zip(reversed(bl.segments), reversed(incoming)):
        b = _Block(bl, s, q, k, v, gate, factored, resets)
        dob = bl.get(do, s) * scale
        dout, carry = affine_scan(b.decay, b.qd().transpose(-1, -2) @ dob, reverse=True, initial=carry)
        dq_b, dk_b = b.scores_bwd(dob @ b.v.transpose(-1, -2))  # the scores' gradient, masked inside
        bl.put(dq, s, dq_b + b.wq * (dob @ h.transpose(-1, -2)))
        bl.put(dk, s, dk_b + b.wk * (b.v @ dout.transpose(-1, -2)))
        bl.put(dv, s, b.scores().transpose(-1, -2) @ dob + (b.k * b.wk) @ dout)
    dg = gate_grad(q, k, dq, dk, full_gate, dfinal, final)
    ds0 = None if initial_state is None else carry
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(gate.dtype), ds0


def gate_grad(
    q: Tensor, k: Tensor, dq: Tensor, dk: Tensor, gate: Tensor, dfinal: Tensor | None, final: Tensor | None
) -> Tensor:
    """The log-gate's gradient [B, T, H, Kg] from the total dq and dk of a causal gated run over T tokens
    (see the module doc), plus the final state's term when it has a gradient. With document starts (-inf
    in `gate`) the reverse sum stops at the next start, only the last document gets the final state's term,
    and a start's own gradient is 0 (its gate multiplies nothing)."""
    dt = dq.dtype
    dG = q.to(dt) * dq - k.to(dt) * dk  # [B, T, H, K]
    if gate.shape[-1] == 1:
        dG = dG.sum(-1, keepdim=True)
    dg = _cumsum_over_t(dG.flip(1)).flip(1)
    end = None
    if dfinal is not None:
        end = (dfinal.to(dt) * final.to(dt)).sum(-1)[:, None]  # [B, 1, H, K]
        if gate.shape[-1] == 1:
            end = end.sum(-1, keepdim=True)
    resets = split_resets(gate)[1]
    if resets is None:
        return dg if end is None else dg + end
    T = gate.shape[1]
    t = torch.arange(T, device=gate.device).view(1, T, 1)
    at = torch.where(resets, t, T)  # [B, T, H]: a start's own index, else T
    after = torch.cat([at[:, 1:], torch.full_like(at[:, :1], T)], 1).flip(1).cummin(1).values.flip(1)
    padded = torch.cat([dg, torch.zeros_like(dg[:, :1])], 1)  # the reverse sum from T is 0
    dg = dg - padded.gather(1, after[..., None].expand_as(dg))  # the sum up to the next start
    if end is not None:
        dg = dg + end * (after == T)[..., None]
    return dg.masked_fill(resets[..., None], 0.0)


# The pieces of a chunk that LASP-2 needs apart (heads expanded; gate [B, L, H, Kg]; states in the state
# dtype). Each weight is exp of a partial sum of gates <= 0, so none exceeds 1.


def _to_end(gate: Tensor) -> Tensor:
    """sum_{s > j} g_s for every token j of the chunk: [B, L, H, Kg] (the gate from j to the chunk's end;
    -inf before a document start), summed from the end, so that no -inf is subtracted."""
    after = gate[:, 1:].flip(1).cumsum(1).flip(1)
    return torch.cat([after, torch.zeros_like(gate[:, :1])], dim=1)


def gated_chunk_state(k: Tensor, v: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """The chunk as an affine map of its incoming state, S_out = Diag(D) S_in + M: (D [B, H, Kg], M [B, H, K,
    V]), M from a zero start."""
    dt = state_dtype(k.dtype)
    g = gate.to(dt)
    M = torch.einsum("blhk,blhv->bhkv", k.to(dt) * torch.exp(_to_end(g)), v.to(dt))
    return torch.exp(g.sum(1)), M


def gated_chunk_state_bwd(k: Tensor, v: Tensor, gate: Tensor, dstate: Tensor) -> tuple[Tensor, Tensor]:
    """(dk, dv) of M in `gated_chunk_state`, given dstate [B, H, K, V], in the state dtype."""
    dt = state_dtype(k.dtype)
    w = torch.exp(_to_end(gate.to(dt)))
    dS = dstate.to(dt)
    return w * torch.einsum("blhv,bhkv->blhk", v.to(dt), dS), torch.einsum("blhk,bhkv->blhv", k.to(dt) * w, dS)


def gated_inter_fwd(q: Tensor, gate: Tensor, state: Tensor, scale: float) -> Tensor:
    """The incoming state's term of the chunk's output: scale (q_t * exp(G_t)) S [B, L, H, V], q's dtype."""
    dt = state_dtype(q.dtype)
    qd = q.to(dt) * torch.exp(gate.to(dt).cumsum(1))
    return (scale * torch.einsum("blhk,bhkv->blhv", qd, state.to(dt))).to(q.dtype)


def gated_inter_bwd(q: Tensor, gate: Tensor, state: Tensor, scale: float, do: Tensor) -> tuple[Tensor, Tensor]:
    """(dq [B, L, H, K] in the state dtype, dstate [B, H, K, V]) of `gated_inter_fwd`."""
    dt = state_dtype(q.dtype)
    w = torch.exp(gate.to(dt).cumsum(1))
    dos = do.to(dt) * scale
    dq = w * torch.einsum("blhv,bhkv->blhk", dos, state.to(dt))
    return dq, torch.einsum("blhk,blhv->bhkv", q.to(dt) * w, dos)
