"""The delta rule (DeltaNet, Gated DeltaNet, KDA), chunked and vectorised in PyTorch: the CPU path.

Legend: B batch, T tokens, H heads, K key dim, V value dim, n blocks of L tokens, Kg gate width (1: a
scalar gate per token and head, Gated DeltaNet; K: a vector gate, KDA).

flash-linear-attention's conventions (docs/design.md, "The affine-map core"):

    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T ,   o_t = scale * q_t^T S_t

with b_t = beta in (0, 2] and g_t <= 0 the log-gate (none: DeltaNet; a scalar commutes, so this is also
Gated DeltaNet's a_t (I - b_t k_t k_t^T) S_{t-1} + ...). q and k are used as given (the layer normalises).

Inside a block, with G_t = g_1 + ... + g_t from the block's start and S_0 the incoming state, every
state is S_t = Diag(exp(G_t)) S_0 + sum_{s<=t} Diag(exp(G_t - G_s)) k_s u_s^T, whose "new values" u solve
the unit lower-triangular system of the WY / UT form (Yang et al., "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"; fla/ops/delta_rule/wy_fast.py):

    (I + A) u = b v - (b exp(G) k) S_0 ,  A_ts = b_t sum_k k_tk k_sk exp(G_tk - G_sk)  (s < t)

so u = U0 - W S_0 with U0 = (I + A)^-1 (b v), W = (I + A)^-1 (b exp(G) k), and the block is an affine map
of S_0 in its output and its state (`block_pieces`):

    o     = P U0 + Qm S_0                 P_ts = scale q_t . (k_s exp(G_t - G_s)), s <= t;  Qm = scale q exp(G) - P W
    S_out = (Diag(exp(G_L)) - Kt^T W) S_0 + Kt^T U0      Kt_s = k_s exp(G_L - G_s)

Every exponent is <= 0 (the [L, L] or, for a vector gate, [L, L, K] pairwise weight is masked before its
exp), so nothing overflows. Blocks are 64 tokens; a vector gate's weight is factored, q exp(G) times
k exp(-G), while every block's gate sums to no less than -FACTOR_SPAN, else exact over 16-token blocks
(as lasp.kernels.linear_attn.gated does). A log-gate of -inf (a document start) counts as 0 in G, and a
segment id per token masks every pairwise weight to one document, drops S_0's terms after a start and
keeps only the block's last document in the state. Across blocks one scan of K x K transitions (`chain`)
gives every block's S_0; the same scan from (I, 0) gives the pair of a whole chunk
(`chunk_transitions`, which LASP-2 all-gathers) and its output pieces (`chunk_outputs`).

The backward (`delta_backward`) recomputes the forward with autograd and differentiates it, one segment of
SEGMENT tokens at a time from the last (a chain pass gives the states entering the segments): the saved
tensors are the inputs, the live graph is one segment's, and nothing of size T x K x K exists.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from lasp.kernels.linear_attn.blocks import FACTOR_SPAN, VECTOR_BLOCK
from lasp.kernels.protocol import state_dtype

BLOCK = 64
SEGMENT = 1024  # tokens whose backward graph lives at once (a multiple of both blocks)


def _blocks(x: Tensor, L: int) -> Tensor:
    """[B, T, H, ...] -> [B, H, n, L, ...], zero-padded at the end (a zero token changes nothing: k = 0
    writes nothing, b = 0 adds nothing, a log-gate of 0 keeps the state)."""
    T = x.shape[1]
    pad = -T % L
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
    x = x.unflatten(1, (-1, L))  # [B, n, L, H, ...]
    return x.movedim(3, 1).contiguous()


def _unblocks(x: Tensor, T: int) -> Tensor:
    """[B, H, n, L, D] -> [B, T, H, D]."""
    return x.movedim(1, 3).flatten(1, 2)[:, :T]


class _Pieces:
    """Every block's affine map, from blocked inputs q, k [B, H, n, L, K], v [B, H, n, L, V], beta
    [B, H, n, L], gate [B, H, n, L, Kg] or None: the transition A [.., K, K] and the zero-start state M
    [.., K, V] (S_out = A S_0 + M) at once, the output's pieces (o = o0 + Qm S_0) on demand, `outputs()`,
    which nothing of the chain waits for (module doc). `factored` (a vector gate whose blocks all sum to
    >= -FACTOR_SPAN): the pairwise weight by matmuls of q exp(G) and k exp(-G) instead of the exact
    [L, L, K] weight."""

    def __init__(self, q, k, v, beta, gate, scale: float, L: int, factored: bool = False):
        idx = torch.arange(L, device=q.device)
        incl = idx[:, None] >= idx[None, :]
        strict = idx[:, None] > idx[None, :]
        if gate is None:
            eG = kt = start_free = None
            w_qk, w_kk = (
                incl.to(q.dtype) * scale,
                strict.to(q.dtype),
            )  # [L, L]: s <= t scaled for q k^T; s < t for k k^T

            def pair(a, b, w):
                return (a @ b.transpose(-1, -2)) * w
        else:
            reset = torch.isneginf(gate[..., 0])  # [B, H, n, L]: a document starts here
            g = gate.masked_fill(reset[..., None], 0.0)
            G = g.cumsum(-2)  # [.., L, Kg]
            seg = reset.to(torch.int32).cumsum(-1)
            keep = (seg[..., :, None] == seg[..., None, :]) & incl  # [.., L, L]: s <= t, one document
            if gate.shape[-1] == 1:  # a_t . b_s exp(G_t - G_s)
                w = torch.exp((G[..., :, None, 0] - G[..., None, :, 0]).masked_fill(~keep, -torch.inf))
                w_qk, w_kk = w * scale, w * strict

                def pair(a, b, w):
                    return (a @ b.transpose(-1, -2)) * w
            elif factored:  # the gate sums to no less than -FACTOR_SPAN over every block: exp(-G) is safe
                eGp, eGm = torch.exp(G), torch.exp(-G)
                w_qk, w_kk = keep.to(q.dtype) * scale, keep & strict

                def pair(a, b, w):
                    return ((a * eGp) @ (b * eGm).transpose(-1, -2)) * w
            else:  # the exact [.., L, L, K] weight: short blocks only
                w = torch.exp((G[..., :, None, :] - G[..., None, :, :]).masked_fill(~keep[..., None], -torch.inf))
                w_qk, w_kk = w * scale, w * strict[..., None]

                def pair(a, b, w):
                    return torch.einsum("...tk,...sk,...tsk->...ts", a, b, w)

            start_free = (seg == 0)[..., None]  # no start since the block's beginning: S_0 still counts
            eG = torch.exp(G) * start_free
            last = seg[..., -1:]
            kt = k * torch.exp(G[..., -1:, :] - G) * (seg == last)[..., None]
        A = pair(k * beta[..., None], k, w_kk)  # A_ts = b_t k_t . k_s (decayed), s < t
        eye = torch.eye(L, dtype=A.dtype, device=A.device)
        bk = beta[..., None] * (k if eG is None else k * eG)
        U0 = torch.linalg.solve_triangular(A + eye, beta[..., None] * v, upper=False, unitriangular=True)
        W = torch.linalg.solve_triangular(A + eye, bk, upper=False, unitriangular=True)
        kt = k if kt is None else kt
        Kdim = k.shape[-1]
        if gate is None:
            decay = torch.eye(Kdim, dtype=q.dtype, device=q.device)
        else:
            eL = (torch.exp(G[..., -1, :]) * start_free[..., -1, :]).expand(*G.shape[:-2], Kdim)
            decay = torch.diag_embed(eL)
        self.A, self.M = decay - kt.transpose(-1, -2) @ W, kt.transpose(-1, -2) @ U0
        self._later = (q, k, pair, w_qk, U0, W, eG, scale)

    def outputs(self) -> tuple[Tensor, Tensor]:
        """(o0 [.., L, V], Qm [.., L, K])."""
        q, k, pair, w_qk, U0, W, eG, scale = self._later
        qk = pair(q, k, w_qk)
        return qk @ U0, scale * (q if eG is None else q * eG) - qk @ W


def block_pieces(q, k, v, beta, gate, scale: float, L: int, outputs: bool = True, factored: bool = False):
    """(o0, Qm, A, M) of every block (`_Pieces`); o0 and Qm are None without `outputs`."""
    p = _Pieces(q, k, v, beta, gate, scale, L, factored)
    o0, Qm = p.outputs() if outputs else (None, None)
    return o0, Qm, p.A, p.M


class _Chain(torch.autograd.Function):
    """S_{j+1} = A_j S_j + M_j over the blocks, with its backward written out: one K x K matmul per block
    each way, and the transitions' gradients in one batched matmul at the end."""

    @staticmethod
    def forward(ctx, A, M, s0):
        B, H, n, K, V = M.shape
        A3, M3 = (x.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, -1) for x in (A, M))
        states = torch.empty_like(M3)
        S = s0.reshape(B * H, K, V)
        for j in range(n):
            states[j] = S
            S = torch.baddbmm(M3[j], A3[j], S)
        ctx.save_for_backward(A3, states)
        ctx.shape = (B, H, n, K, V)
        return states.view(n, B, H, K, V).permute(1, 2, 0, 3, 4), S.view(B, H, K, V)

    @staticmethod
    def backward(ctx, dstates, dfinal):
        A3, states = ctx.saved_tensors
        B, H, n, K, V = ctx.shape
        dS3 = None if dstates is None else dstates.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, V)
        g = (
            torch.zeros(B * H, K, V, dtype=states.dtype, device=states.device)
            if dfinal is None
            else dfinal.reshape(B * H, K, V).to(states.dtype)
        )
        dM = torch.empty_like(states)  # the gradient of each block's outgoing state
        for j in range(n - 1, -1, -1):
            dM[j] = g
            g = torch.bmm(A3[j].transpose(-1, -2), g)
            if dS3 is not None:
                g = g + dS3[j]
        dA = dM @ states.transpose(-1, -2)
        back = lambda x, D: x.view(n, B, H, K, D).permute(1, 2, 0, 3, 4)  # noqa: E731
        return back(dA, K), back(dM, V), g.view(B, H, K, V)


def chain(A: Tensor, M: Tensor, s0: Tensor | None) -> tuple[Tensor, Tensor]:
    """S_0 of every block, [B, H, n, K, V], and the final state: S_{j+1} = A_j S_j + M_j from s0 (None:
    zero)."""
    return _Chain.apply(A, M, torch.zeros_like(M[:, :, 0]) if s0 is None else s0)


def _prepare(q, k, v, beta, gate):
    """Blocked inputs in the state dtype: ([q, k, v], beta, gate, L, factored). A vector gate gets 64-token
    blocks and the factored weight when every block's gate sums to >= -FACTOR_SPAN, else 16-token blocks
    and the exact weight (one host read of the check)."""
    dt = state_dtype(q.dtype)
    T = max(q.shape[1], 1)
    L, factored = min(BLOCK, T), False
    if gate is not None and gate.shape[-1] > 1:
        g = _blocks(gate.to(dt).masked_fill(torch.isneginf(gate), 0.0), L)
        factored = bool((g.sum(-2) >= -FACTOR_SPAN).all())
        L = L if factored else min(VECTOR_BLOCK, T)
    blocked = [_blocks(x.to(dt), L) for x in (q, k, v)]
    b = _blocks(beta.to(dt)[..., None], L)[..., 0]
    g = None if gate is None else _blocks(gate.to(dt), L)
    return blocked, b, g, L, factored


def delta_forward(q, k, v, beta, gate, scale: float, s0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The delta rule over T from s0 [B, H, K, V] (None: zero) -> (o [B, T, H, V] in the state dtype, final
    state [B, H, K, V], the states entering every SEGMENT tokens [ceil(T / SEGMENT), B, H, K, V], which
    `delta_backward` takes to skip its chain pass). Differentiable by autograd (`delta_backward` runs it
    again under it)."""
    (qb, kb, vb), b, g, L, factored = _prepare(q, k, v, beta, gate)
    o0, Qm, A, M = block_pieces(qb, kb, vb, b, g, scale, L, factored=factored)
    states, final = chain(A, M, None if s0 is None else s0.to(qb.dtype))
    return _unblocks(o0 + Qm @ states, q.shape[1]), final, states[:, :, :: SEGMENT // L].movedim(2, 0)


def chunk_transitions(q, k, v, beta, gate, scale: float):
    """A whole chunk's pair (A [B, H, K, K], M [B, H, K, V]): S_out = A S_in + M, in the state dtype, and
    what `chunk_outputs` needs. The chain runs on the state [P | S] from [I | 0]: P collects the
    transitions, S the zero-start state."""
    (qb, kb, vb), b, g, L, factored = _prepare(q, k, v, beta, gate)
    p = _Pieces(qb, kb, vb, b, g, scale, L, factored)
    B, H, n, K, _ = p.A.shape
    eye = torch.eye(K, dtype=p.M.dtype, device=p.M.device).expand(B, H, K, K)
    aug = torch.cat([torch.zeros_like(p.A), p.M], dim=-1)  # the transitions' own "values" are zero
    states, final = chain(p.A, aug, torch.cat([eye, torch.zeros_like(p.M[:, :, 0])], dim=-1))
    return final[..., :K], final[..., K:], (p, states, q.shape[1])


def chunk_outputs(rest) -> tuple[Tensor, Tensor]:
    """The chunk's output as an affine map of S_in, o = o0 + Qm S_in: (o0 [B, T, H, V], Qm [B, T, H, K]),
    from `chunk_transitions`' second part (LASP-2 runs this while the pairs are in flight)."""
    p, states, T = rest
    o0, Qm = p.outputs()
    K = Qm.shape[-1]
    out = torch.cat([torch.zeros_like(Qm), o0], dim=-1) + Qm @ states
    return _unblocks(out[..., K:], T), _unblocks(out[..., :K], T)


def chunk_maps(q, k, v, beta, gate, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A whole chunk as an affine map of its incoming state S_in: (o0 [B, T, H, V], Qm [B, T, H, K], A
    [B, H, K, K], M [B, H, K, V]) with o = o0 + Qm S_in and S_out = A S_in + M, in the state dtype."""
    A, M, rest = chunk_transitions(q, k, v, beta, gate, scale)
    return *chunk_outputs(rest), A, M


def _states_at(q, k, v, beta, gate, scale: float, s0: Tensor | None, starts: list[int]) -> list[Tensor | None]:
    """The state entering each token index of `starts` (ascending, the first 0), by the chain alone: no
    output is formed, nothing is kept for a backward."""
    out, S = [], s0
    with torch.no_grad():
        for a, b in zip(starts, starts[1:] + [None]):
            out.append(S)
            if b is None:
                break
            (qb, kb, vb), bb, gb, L, factored = _prepare(
                *(x[:, a:b] for x in (q, k, v, beta)), None if gate is None else gate[:, a:b]
            )
            _, _, A, M = block_pieces(qb, kb, vb, bb, gb, scale, L, outputs=False, factored=factored)
            S = chain(A, M, None if S is None else S.to(qb.dtype))[1]
    return out


def delta_backward(q, k, v, beta, gate, scale: float, s0, do, dfinal, need_s0: bool, checkpoints=None):
    """(dq, dk, dv, dbeta, dgate or None, ds0 or None) of `delta_forward`, given do and the final state's
    gradient (or None), by differentiating its recomputation one segment of SEGMENT tokens at a time, from
    the last: the states entering the segments are `checkpoints` (delta_forward's third output) or come
    from a chain pass, and each segment hands the gradient of its incoming state to the one before. The
    live graph is one segment's."""
    T = q.shape[1]
    starts = list(range(0, T, SEGMENT)) or [0]
    if checkpoints is None:
        states = _states_at(q, k, v, beta, gate, scale, s0, starts)
    else:
        states = [None if (i == 0 and s0 is None) else c for i, c in enumerate(checkpoints.unbind(0))]
    grads = [torch.empty_like(x) for x in (q, k, v, beta)] + ([torch.empty_like(gate)] if gate is not None else [])
    dS = dfinal
    for i in range(len(starts) - 1, -1, -1):
        a, b = starts[i], (starts[i + 1] if i + 1 < len(starts) else T)
        first = i == 0
        with torch.enable_grad():
            xs = [x[:, a:b].detach().requires_grad_() for x in (q, k, v, beta)]
            g = None if gate is None else gate[:, a:b].detach().requires_grad_()
            s = states[i]
            want_s = s is not None and (need_s0 or not first)
            if s is not None:
                s = s.detach().requires_grad_(want_s)
            o, final, _ = delta_forward(*xs, g, scale, s)
            outs, seeds = [o], [do[:, a:b].to(o.dtype)]
            if dS is not None:
                outs.append(final)
                seeds.append(dS.to(final.dtype))
            inputs = xs + ([g] if g is not None else []) + ([s] if want_s else [])
            got = torch.autograd.grad(outs, inputs, seeds, allow_unused=True)
        for dst, src, x in zip(grads, got, inputs):
            if src is None:
                dst[:, a:b].zero_()
            else:
                dst[:, a:b].copy_(src)
        dS = got[-1] if want_s else None
    dq, dk, dv, db = grads[:4]
    dg = grads[4] if gate is not None else None
    return dq, dk, dv, db, dg, (dS if need_s0 and s0 is not None else None)
