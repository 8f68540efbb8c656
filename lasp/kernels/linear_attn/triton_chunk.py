"""`TritonChunkKernel`: the kernel protocol on the Triton kernels of `triton_kernels.py` (GPU; on CPU
only in Triton's interpreter, TRITON_INTERPRET=1). `chunk.py` (PyTorch) is its reference, with the same
methods, and `gated.py` for the scalar gate's (`GatedKernel`).

Legend: B batch, T tokens, H heads, K key dim, V value dim, NT chunks.
"""

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from lasp.kernels.linear_attn import gated
from lasp.kernels.linear_attn.triton_kernels import chunk_dqk, chunk_out, walk_both, walk_bwd, walk_fwd
from lasp.kernels.protocol import Capabilities

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _walk_grid(B, H, K, V):
    return lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]), B * H)


def _v_grid(B, H, V, NT):
    return lambda meta: (triton.cdiv(V, meta["BV"]), NT, B * H)


def _k_grid(B, H, K, NT):
    return lambda meta: (triton.cdiv(K, meta["BK"]), NT, B * H)


def scalar_gate(gate: Tensor) -> Tensor:
    """The protocol's gate [B, T, H, 1] -> [B, T, H] in fp32; a vector gate is a clear error."""
    if gate.dim() != 4 or gate.shape[-1] != 1:
        raise ValueError(
            f"the Triton kernels have the scalar gate only ([B, T, H, 1] here), got {list(gate.shape)}; "
            "use the torch kernel for a vector gate"
        )
    return gate[..., 0].float()


class _Weights:
    """What the kernels read to weight each token: the per-head log decay g [H] (zeros without decay), or
    under a scalar gate g [B, T, H] its fp32 cumulative sum, in the form a launch needs, so that every
    weight is exp of a sum of gates (<= 0):
        chunk()  from each chunk's start: the walks and the per-chunk launches (G_i - G_j, G_i, G_last - G_i);
        start()  from the sequence's start: queries against one state (G_t);
        end()    minus the sum after t to the sequence's end (0 at the last token): keys into one state
                 (G_last - G_t is then that sum itself, exact however long the sequence)."""

    def __init__(self, log_decay: Tensor | None, gate: Tensor | None, H: int, BT: int, device):
        self.gate, self.BT = gate, BT
        self.g = torch.zeros(H, device=device) if log_decay is None else log_decay.float().contiguous()

    def chunk(self) -> Tensor:
        if self.gate is None:
            return self.g
        B, T, H = self.gate.shape
        NT = triton.cdiv(T, self.BT)
        padded = F.pad(self.gate, (0, 0, 0, NT * self.BT - T))
        return padded.view(B, NT, self.BT, H).cumsum(2).view(B, NT * self.BT, H)[:, :T].contiguous()

    def start(self) -> Tensor:
        return self.g if self.gate is None else self.gate.cumsum(1).contiguous()

    def end(self) -> Tensor:
        if self.gate is None:
            return self.g
        after = self.gate[:, 1:].flip(1).cumsum(1).flip(1)  # summed from the end: exact near it
        return -torch.cat([after, torch.zeros_like(self.gate[:, :1])], dim=1)


class TritonChunkKernel:
    """`LinearAttnKernel` and, for the scalar gate, `GatedKernel` in Triton: chunks of `block` tokens (a
    power of two >= 16). `fwd` / `bwd` start the state walks from the initial state and the final state's
    gradient, as flash-linear-attention does; intra_fwd / intra_bwd are them without states. The gated
    calls run the same kernels with the gate's weights; the gate's gradient comes from the fp32 dq and dk
    in PyTorch (`gated.gate_grad`)."""

    name = "triton"
    # a vector gate (GLA), document starts (a gate of -inf) and the delta rule stay on the torch kernel
    caps = Capabilities(gates=("scalar",))

    def __init__(self, block: int = 64):
        if block < 16 or block & (block - 1):
            raise ValueError(f"Triton chunk size must be a power of two >= 16, got {block}")
        self.block = block

    def _setup(self, x: Tensor, v: Tensor, log_decay: Tensor | None, gate: Tensor | None = None):
        B, T, H, K = x.shape
        V = v.shape[-1]
        if x.dtype not in DTYPES:
            raise ValueError(
                f"Triton kernels take float32, bfloat16 or float16 inputs, got {x.dtype} "
                "(use the torch kernel for float64)"
            )
        w = _Weights(log_decay, gate, H, self.block, x.device)
        meta = dict(
            T=T,
            H=H,
            K=K,
            V=V,
            BT=self.block,
            HAS_DECAY=log_decay is not None,
            GATED=gate is not None,
            DOT_PREC="tf32x3" if x.dtype == torch.float32 else "tf32",
        )
        return B, T, H, K, V, triton.cdiv(T, self.block), w, meta

    def chunk_decay(self, log_decay: Tensor | None, length: int) -> Tensor | None:
        return None if log_decay is None else torch.exp(log_decay.to(torch.float64) * length)

    def chunk_state(self, k, v, log_decay):
        return self._chunk_state(k, v, log_decay, None)

    def _chunk_state(self, k, v, log_decay, gate):
        B, T, H, K, V, NT, w, meta = self._setup(k, v, log_decay, gate)
        final = k.new_empty(B, H, K, V, dtype=torch.float32)
        walk_fwd[_walk_grid(B, H, K, V)](
            k.contiguous(),
            v.contiguous(),
            w.chunk(),
            final,
            final,
            final,
            NBH=B * H,
            HAS_H0=False,
            STORE_H=False,
            STORE_FINAL=True,
            **meta,
        )
        return final

    def chunk_state_bwd(self, k, v, log_decay, dstate):
        return self._chunk_state_bwd(k, v, log_decay, None, dstate, k.dtype)

    def _chunk_state_bwd(self, k, v, log_decay, gate, dstate, dtype):
        B, T, H, K, V, NT, w, meta = self._setup(k, v, log_decay, gate)
        k, v, dm = k.contiguous(), v.contiguous(), dstate.float().contiguous()
        dk, dv = torch.empty_like(k, dtype=dtype), torch.empty_like(v, dtype=dtype)
        g, flags = w.end(), dict(INTRA=False, PER_CHUNK=False)
        chunk_out[_v_grid(B, H, V, NT)](k, k, v, g, dm, dv, 1.0, 1.0, REVERSE=True, **flags, **meta)
        chunk_dqk[_k_grid(B, H, K, NT)](
            k, k, v, g, dm, dm, v, dk, dk, 1.0, WANT_DQ=False, WANT_DK=True, **flags, **meta
        )
        return dk, dv

    def inter_fwd(self, q, state, log_decay, scale):
        return self._inter_fwd(q, state, log_decay, None, scale)

    def _inter_fwd(self, q, state, log_decay, gate, scale):
        B, T, H, K, V, NT, w, meta = self._setup(q, state, log_decay, gate)
        q = q.contiguous()
        o = q.new_empty(B, T, H, V)
        chunk_out[_v_grid(B, H, V, NT)](
            q,
            q,
            o,
            w.start(),
            state.float().contiguous(),
            o,
            scale,
            scale,
            INTRA=False,
            PER_CHUNK=False,
            REVERSE=False,
            **meta,
        )
        return o

    def inter_bwd(self, q, state, log_decay, scale, do):
        return self._inter_bwd(q, state, log_decay, None, scale, do, q.dtype)

    def _inter_bwd(self, q, state, log_decay, gate, scale, do, dtype):
        B, T, H, K, V, NT, w, meta = self._setup(q, state, log_decay, gate)
        q, do = q.contiguous(), do.contiguous()
        dq = torch.empty_like(q, dtype=dtype)
        s = state.float().contiguous()
        chunk_dqk[_k_grid(B, H, K, NT)](
            q,
            q,
            do,
            w.start(),
            s,
            s,
            do,
            dq,
            dq,
            scale,
            INTRA=False,
            PER_CHUNK=False,
            WANT_DQ=True,
            WANT_DK=False,
            **meta,
        )
        ds = torch.empty_like(s)
        walk_bwd[_walk_grid(B, H, K, V)](
            q, do, w.chunk(), ds, ds, ds, scale, NBH=B * H, HAS_DHT=False, STORE_H=False, STORE_FINAL=True, **meta
        )
        return dq, ds

    def fwd(self, q, k, v, log_decay, scale, initial_state, want_final):
        return self._fwd(q, k, v, log_decay, None, scale, initial_state, want_final)

    def _fwd(self, q, k, v, log_decay, gate, scale, initial_state, want_final):
        B, T, H, K, V, NT, w, meta = self._setup(q, v, log_decay, gate)
        q, k, v, g = q.contiguous(), k.contiguous(), v.contiguous(), w.chunk()
        h = q.new_empty(B, H, NT, K, V, dtype=torch.float32 if q.dtype == torch.float32 else q.dtype)
        final = q.new_empty(B, H, K, V, dtype=torch.float32) if want_final else h
        h0 = h if initial_state is None else initial_state.float().contiguous()
        walk_fwd[_walk_grid(B, H, K, V)](
            k,
            v,
            g,
            h0,
            h,
            final,
            NBH=B * H,
            HAS_H0=initial_state is not None,
            STORE_H=True,
            STORE_FINAL=want_final,
            **meta,
        )
        o = torch.empty_like(v)
        chunk_out[_v_grid(B, H, V, NT)](
            q, k, v, g, h, o, scale, scale, INTRA=True, PER_CHUNK=True, REVERSE=False, **meta
        )
        return o, (final if want_final else None)

    def bwd(self, q, k, v, log_decay, scale, initial_state, do, dfinal):
        return self._bwd(q, k, v, log_decay, None, scale, initial_state, do, dfinal)[:4]

    def _bwd(self, q, k, v, log_decay, gate, scale, initial_state, do, dfinal):
        """(dq, dk, dv, d initial_state or None, final state or None). Under a gate dq and dk are fp32 and,
        with dfinal, the final state comes too: the gate's gradient is made of them."""
        B, T, H, K, V, NT, w, meta = self._setup(q, v, log_decay, gate)
        q, k, v, do, g = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), w.chunk()
        h = q.new_empty(B, H, NT, K, V, dtype=torch.float32)
        dh = torch.empty_like(h)
        dh0 = h if initial_state is None else q.new_empty(B, H, K, V, dtype=torch.float32)
        h0 = h if initial_state is None else initial_state.float().contiguous()
        dht = h if dfinal is None else dfinal.float().contiguous()
        want_final = gate is not None and dfinal is not None
        final = q.new_empty(B, H, K, V, dtype=torch.float32) if want_final else h
        grid = _walk_grid(B, H, K, V)
        walk_both[lambda meta_: (*grid(meta_), 2)](
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
            NBH=B * H,
            HAS_H0=initial_state is not None,
            HAS_DHT=dfinal is not None,
            STORE_DH0=initial_state is not None,
            STORE_FINAL=want_final,
            **meta,
        )
        dqk_dtype = q.dtype if gate is None else torch.float32
        dq, dk = torch.empty_like(q, dtype=dqk_dtype), torch.empty_like(k, dtype=dqk_dtype)
        dv = torch.empty_like(v)
        flags = dict(INTRA=True, PER_CHUNK=True)
        chunk_out[_v_grid(B, H, V, NT)](k, q, do, g, dh, dv, 1.0, scale, REVERSE=True, **flags, **meta)
        chunk_dqk[_k_grid(B, H, K, NT)](
            q, k, v, g, h, dh, do, dq, dk, scale, WANT_DQ=True, WANT_DK=True, **flags, **meta
        )
        return dq, dk, dv, (None if initial_state is None else dh0), (final if want_final else None)

    def intra_fwd(self, q, k, v, log_decay, scale):
        return self.fwd(q, k, v, log_decay, scale, None, False)[0]

    def intra_bwd(self, q, k, v, log_decay, scale, do):
        return self.bwd(q, k, v, log_decay, scale, None, do, None)[:3]

    def gated_fwd(self, q, k, v, gate, scale, initial_state, want_final):
        return self._fwd(q, k, v, None, scalar_gate(gate), scale, initial_state, want_final)

    def gated_bwd(self, q, k, v, gate, scale, initial_state, do, dfinal):
        dq, dk, dv, ds0, final = self._bwd(q, k, v, None, scalar_gate(gate), scale, initial_state, do, dfinal)
        dg = gated.gate_grad(q, k, dq, dk, gate, dfinal, final)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(gate.dtype), ds0

    def gated_chunk_state(self, k, v, gate):
        g = scalar_gate(gate)
        return torch.exp(g.sum(1))[..., None], self._chunk_state(k, v, None, g)

    def gated_chunk_state_bwd(self, k, v, gate, dstate):
        return self._chunk_state_bwd(k, v, None, scalar_gate(gate), dstate, torch.float32)

    def gated_inter_fwd(self, q, gate, state, scale):
        return self._inter_fwd(q, state, None, scalar_gate(gate), scale)

    def gated_inter_bwd(self, q, gate, state, scale, do):
        return self._inter_bwd(q, state, None, scalar_gate(gate), scale, do, torch.float32)

    gate_grad = staticmethod(gated.gate_grad)
