"""Chunked, vectorised PyTorch linear attention: the CPU production path and the kernels' ground truth.

Legend: B batch, T tokens, H heads, K key dim, V value dim, N blocks, C block size.

The sequence is cut into blocks of C tokens (front-padded with zeros, which add nothing to any state and
keep decay exponents measured from the true end). Inside a block: masked, decayed q k^T times v. Across
blocks: block states K^T V and a decayed scan, applied as a right product q H. Blocks are processed a
segment at a time so the working set stays in cache and the cost per token does not grow with T.
Everything runs in the state dtype (float32, or float64 for float64 inputs) and is cast back at the end.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from lasp.kernels.linear_attn import delta as delta_rule
from lasp.kernels.linear_attn import gated
from lasp.kernels.linear_attn.blocks import Blocks
from lasp.kernels.protocol import Capabilities, ComposedStates, state_dtype
from lasp.kernels.scan import decayed_scan

BLOCK = 64
SEGMENT_BLOCKS = 16


def _powers(log_decay: Tensor, exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """lambda^e per head and exponent: [H, len(e)]."""
    return torch.exp(log_decay.to(dtype)[:, None] * exponents.to(dtype)[None, :])


def _token_powers(log_decay: Tensor | None, T: int, offset: int, reverse: bool, like: Tensor):
    """lambda^(t + offset) (or lambda^(T - 1 - t + offset)) as [1, T, H, 1], or None without decay."""
    if log_decay is None:
        return None
    t = torch.arange(T, device=like.device)
    e = (T - 1 - t if reverse else t) + offset
    return _powers(log_decay, e, like.dtype).T[None, :, :, None]


def _mul(x: Tensor, w: Tensor | None) -> Tensor:
    return x if w is None else x * w


@dataclass
class _BlockDecay:
    mask_HCC: Tensor  # lambda^(i-j) for i >= j, else 0: causal mask and decay in one
    q_HC1: Tensor | None  # lambda^(i+1): decay of the incoming block state seen by query i
    k_HC1: Tensor | None  # lambda^(C-1-i): decay of key i up to the block end
    block_H: Tensor | None  # lambda^C


def _block_decay(log_decay: Tensor | None, C: int, dtype: torch.dtype, device) -> _BlockDecay:
    i = torch.arange(C, device=device)
    diff = i[:, None] - i[None, :]
    if log_decay is None:
        return _BlockDecay((diff >= 0).to(dtype)[None], None, None, None)
    g = log_decay.to(dtype)
    expo = torch.where(diff >= 0, g[:, None, None] * diff, torch.full((), -torch.inf, dtype=dtype))
    return _BlockDecay(
        mask_HCC=torch.exp(expo),
        q_HC1=_powers(g, i + 1, dtype)[:, :, None],
        k_HC1=_powers(g, C - 1 - i, dtype)[:, :, None],
        block_H=torch.exp(g * C),
    )


class TorchChunkKernel(ComposedStates):
    """`LinearAttnKernel` in plain PyTorch (any device): blocks of `block` tokens, processed
    `segment_blocks` blocks at a time."""

    name = "torch"
    caps = Capabilities(gates=("scalar", "vector"), resets=True, delta=True)

    def gated_fwd(self, q, k, v, gate, scale, initial_state, want_final):
        return gated.gated_fwd(q, k, v, gate, scale, initial_state, want_final, self.block, self.segment_blocks)

    def gated_bwd(self, q, k, v, gate, scale, initial_state, do, dfinal):
        return gated.gated_bwd(q, k, v, gate, scale, initial_state, do, dfinal, self.block, self.segment_blocks)

    gated_chunk_state = staticmethod(gated.gated_chunk_state)
    gated_chunk_state_bwd = staticmethod(gated.gated_chunk_state_bwd)
    gated_inter_fwd = staticmethod(gated.gated_inter_fwd)
    gated_inter_bwd = staticmethod(gated.gated_inter_bwd)
    gate_grad = staticmethod(gated.gate_grad)

    delta_fwd = staticmethod(delta_rule.delta_forward)  # the delta rule (beta): lasp.kernels.linear_attn.delta
    delta_bwd = staticmethod(delta_rule.delta_backward)
    delta_transitions = staticmethod(delta_rule.chunk_transitions)
    delta_outputs = staticmethod(delta_rule.chunk_outputs)

    def __init__(self, block: int = BLOCK, segment_blocks: int = SEGMENT_BLOCKS):
        if block < 1 or segment_blocks < 1:
            raise ValueError(f"block and segment_blocks must be >= 1, got {block}, {segment_blocks}")
        self.block, self.segment_blocks = block, segment_blocks

    def chunk_decay(self, log_decay: Tensor | None, length: int) -> Tensor | None:
        if log_decay is None:
            return None
        # float64 here costs nothing ([H]) and the scan casts it to the state dtype.
        return torch.exp(log_decay.to(torch.float64) * length)

    def chunk_state(self, k, v, log_decay):
        dt = state_dtype(k.dtype)
        kk = _mul(k.to(dt), _token_powers(log_decay, k.shape[1], 0, True, k.to(dt)))
        return torch.einsum("bthk,bthv->bhkv", kk, v.to(dt))

    def chunk_state_bwd(self, k, v, log_decay, dstate):
        dt = state_dtype(k.dtype)
        dS = dstate.to(dt)
        w = _token_powers(log_decay, k.shape[1], 0, True, dS)
        dk = _mul(torch.einsum("bthv,bhkv->bthk", v.to(dt), dS), w)
        dv = torch.einsum("bthk,bhkv->bthv", _mul(k.to(dt), w), dS)
        return dk.to(k.dtype), dv.to(v.dtype)

    def inter_fwd(self, q, state, log_decay, scale):
        dt = state_dtype(q.dtype)
        S = state.to(dt)
        qd = _mul(q.to(dt), _token_powers(log_decay, q.shape[1], 1, False, S))
        return (scale * torch.einsum("bthk,bhkv->bthv", qd, S)).to(q.dtype)

    def inter_bwd(self, q, state, log_decay, scale, do):
        dt = state_dtype(q.dtype)
        S = state.to(dt)
        w = _token_powers(log_decay, q.shape[1], 1, False, S)
        dos = do.to(dt) * scale
        dq = _mul(torch.einsum("bthv,bhkv->bthk", dos, S), w)
        dS = torch.einsum("bthk,bthv->bhkv", _mul(q.to(dt), w), dos)
        return dq.to(q.dtype), dS

    def _blocks(self, T: int, dtype: torch.dtype) -> Blocks:
        return Blocks(T, min(self.block, T), self.segment_blocks, state_dtype(dtype))

    def intra_fwd(self, q, k, v, log_decay, scale):
        bl = self._blocks(q.shape[1], q.dtype)
        d = _block_decay(log_decay, bl.C, bl.dtype, q.device)
        o = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        carry = None
        for s in bl.segments:
            qb, kb, vb = bl.get(q, s), bl.get(k, s), bl.get(v, s)
            kv = _mul(kb, d.k_HC1).transpose(-1, -2) @ vb
            h, carry = decayed_scan(kv, d.block_H, dim=0, initial=carry)
            ob = ((qb @ kb.transpose(-1, -2)) * d.mask_HCC) @ vb + _mul(qb, d.q_HC1) @ h
            bl.put(o, s, ob * scale)
        return o

    def intra_bwd(self, q, k, v, log_decay, scale, do):
        bl = self._blocks(q.shape[1], q.dtype)
        d = _block_decay(log_decay, bl.C, bl.dtype, q.device)
        h_blocks, carry = [], None
        for s in bl.segments:
            kv = _mul(bl.get(k, s), d.k_HC1).transpose(-1, -2) @ bl.get(v, s)
            h, carry = decayed_scan(kv, d.block_H, dim=0, initial=carry)
            h_blocks.append(h)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        carry = None
        for s, h in zip(reversed(bl.segments), reversed(h_blocks)):
            qb, kb, vb, dob = bl.get(q, s), bl.get(k, s), bl.get(v, s), bl.get(do, s) * scale
            kd = _mul(kb, d.k_HC1)
            a = (qb @ kb.transpose(-1, -2)) * d.mask_HCC
            da = (dob @ vb.transpose(-1, -2)) * d.mask_HCC
            dh = _mul(qb, d.q_HC1).transpose(-1, -2) @ dob
            dkv, carry = decayed_scan(dh, d.block_H, dim=0, reverse=True, initial=carry)
            bl.put(dq, s, da @ kb + _mul(dob @ h.transpose(-1, -2), d.q_HC1))
            bl.put(dk, s, da.transpose(-1, -2) @ qb + _mul(vb @ dkv.transpose(-1, -2), d.k_HC1))
            bl.put(dv, s, a.transpose(-1, -2) @ dob + kd @ dkv)
        return dq, dk, dv
