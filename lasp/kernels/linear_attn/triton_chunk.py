"""`TritonChunkKernel`: the kernel protocol on the Triton kernels of `triton_kernels.py` (GPU; on CPU
only in Triton's interpreter, TRITON_INTERPRET=1). `chunk.py` (PyTorch) is its reference, with the same
methods.

Legend: B batch, T tokens, H heads, K key dim, V value dim, NT chunks.
"""

import torch
import triton
from torch import Tensor

from lasp.kernels.linear_attn.triton_kernels import chunk_dqk, chunk_out, walk_both, walk_bwd, walk_fwd

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _walk_grid(B, H, K, V):
    return lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]), B * H)


def _v_grid(B, H, V, NT):
    return lambda meta: (triton.cdiv(V, meta["BV"]), NT, B * H)


def _k_grid(B, H, K, NT):
    return lambda meta: (triton.cdiv(K, meta["BK"]), NT, B * H)


class TritonChunkKernel:
    """`LinearAttnKernel` in Triton: chunks of `block` tokens (a power of two >= 16). `fwd` / `bwd` start
    the state walks from the initial state and the final state's gradient, as flash-linear-attention
    does; intra_fwd / intra_bwd are them without states."""

    name = "triton"
    gates = ()  # no gated Triton kernel yet: linear_attn refuses a gate on this backend

    def __init__(self, block: int = 64):
        if block < 16 or block & (block - 1):
            raise ValueError(f"Triton chunk size must be a power of two >= 16, got {block}")
        self.block = block

    def _setup(self, x: Tensor, v: Tensor, log_decay: Tensor | None):
        B, T, H, K = x.shape
        V = v.shape[-1]
        if x.dtype not in DTYPES:
            raise ValueError(f"Triton kernels take float32, bfloat16 or float16 inputs, got {x.dtype} "
                             "(use the torch kernel for float64)")
        g = torch.zeros(H, device=x.device) if log_decay is None else log_decay.float().contiguous()
        meta = dict(T=T, H=H, K=K, V=V, BT=self.block, HAS_DECAY=log_decay is not None,
                    DOT_PREC="tf32x3" if x.dtype == torch.float32 else "tf32")
        return B, T, H, K, V, triton.cdiv(T, self.block), g, meta

    def chunk_decay(self, log_decay: Tensor | None, length: int) -> Tensor | None:
        return None if log_decay is None else torch.exp(log_decay.to(torch.float64) * length)

    def chunk_state(self, k, v, log_decay):
        B, T, H, K, V, NT, g, meta = self._setup(k, v, log_decay)
        final = k.new_empty(B, H, K, V, dtype=torch.float32)
        walk_fwd[_walk_grid(B, H, K, V)](k.contiguous(), v.contiguous(), g, final, final, final, NBH=B * H,
                                         HAS_H0=False, STORE_H=False, STORE_FINAL=True, **meta)
        return final

    def chunk_state_bwd(self, k, v, log_decay, dstate):
        B, T, H, K, V, NT, g, meta = self._setup(k, v, log_decay)
        k, v, dm = k.contiguous(), v.contiguous(), dstate.float().contiguous()
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        flags = dict(INTRA=False, PER_CHUNK=False)
        chunk_out[_v_grid(B, H, V, NT)](k, k, v, g, dm, dv, 1.0, 1.0, REVERSE=True, **flags, **meta)
        chunk_dqk[_k_grid(B, H, K, NT)](k, k, v, g, dm, dm, v, dk, dk, 1.0, WANT_DQ=False, WANT_DK=True, **flags,
                                        **meta)
        return dk, dv

    def inter_fwd(self, q, state, log_decay, scale):
        B, T, H, K, V, NT, g, meta = self._setup(q, state, log_decay)
        q = q.contiguous()
        o = q.new_empty(B, T, H, V)
        chunk_out[_v_grid(B, H, V, NT)](q, q, o, g, state.float().contiguous(), o, scale, scale, INTRA=False,
                                        PER_CHUNK=False, REVERSE=False, **meta)
        return o

    def inter_bwd(self, q, state, log_decay, scale, do):
        B, T, H, K, V, NT, g, meta = self._setup(q, state, log_decay)
        q, do = q.contiguous(), do.contiguous()
        dq = torch.empty_like(q)
        s = state.float().contiguous()
        chunk_dqk[_k_grid(B, H, K, NT)](q, q, do, g, s, s, do, dq, dq, scale, INTRA=False, PER_CHUNK=False,
                                        WANT_DQ=True, WANT_DK=False, **meta)
        ds = torch.empty_like(s)
        walk_bwd[_walk_grid(B, H, K, V)](q, do, g, ds, ds, ds, scale, NBH=B * H, HAS_DHT=False, STORE_H=False,
                                         STORE_FINAL=True, **meta)
        return dq, ds

    def fwd(self, q, k, v, log_decay, scale, initial_state, want_final):
        B, T, H, K, V, NT, g, meta = self._setup(q, v, log_decay)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = q.new_empty(B, H, NT, K, V, dtype=torch.float32 if q.dtype == torch.float32 else q.dtype)
        final = q.new_empty(B, H, K, V, dtype=torch.float32) if want_final else h
        h0 = h if initial_state is None else initial_state.float().contiguous()
        walk_fwd[_walk_grid(B, H, K, V)](k, v, g, h0, h, final, NBH=B * H, HAS_H0=initial_state is not None,
                                         STORE_H=True, STORE_FINAL=want_final, **meta)
        o = torch.empty_like(v)
        chunk_out[_v_grid(B, H, V, NT)](q, k, v, g, h, o, scale, scale, INTRA=True, PER_CHUNK=True, REVERSE=False,
                                        **meta)
        return o, (final if want_final else None)

    def bwd(self, q, k, v, log_decay, scale, initial_state, do, dfinal):
        B, T, H, K, V, NT, g, meta = self._setup(q, v, log_decay)
        q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
        h = q.new_empty(B, H, NT, K, V, dtype=torch.float32)
        dh = torch.empty_like(h)
        dh0 = h if initial_state is None else q.new_empty(B, H, K, V, dtype=torch.float32)
        h0 = h if initial_state is None else initial_state.float().contiguous()
        dht = h if dfinal is None else dfinal.float().contiguous()
        grid = _walk_grid(B, H, K, V)
        walk_both[lambda meta_: (*grid(meta_), 2)](
            k, v, q, do, g, h0, dht, h, dh, dh0, scale, NBH=B * H, HAS_H0=initial_state is not None,
            HAS_DHT=dfinal is not None, STORE_DH0=initial_state is not None, **meta)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flags = dict(INTRA=True, PER_CHUNK=True)
        chunk_out[_v_grid(B, H, V, NT)](k, q, do, g, dh, dv, 1.0, scale, REVERSE=True, **flags, **meta)
        chunk_dqk[_k_grid(B, H, K, NT)](q, k, v, g, h, dh, do, dq, dk, scale, WANT_DQ=True, WANT_DK=True,
                                        **flags, **meta)
        return dq, dk, dv, (None if initial_state is None else dh0)

    def intra_fwd(self, q, k, v, log_decay, scale):
        return self.fwd(q, k, v, log_decay, scale, None, False)[0]

    def intra_bwd(self, q, k, v, log_decay, scale, do):
        return self.bwd(q, k, v, log_decay, scale, None, do, None)[:3]
