"""A rank's chunks under a data-dependent gate, as the SP algorithms use them (LASP-2, LASP-1).

Legend: n chunks per rank, B batch, L chunk length, H heads, K key dim, V value dim, Kg gate width (1: a
scalar gate per token and head, K: a vector gate).

Each chunk c is an affine map of its incoming state, S_out = Diag(D_c) S_in + M_c (DESIGN.md, "Beyond
constant decay"). An SP algorithm only moves the pairs (D_c, M_c) forward and the state gradients N_c
backward, and scans them in global chunk order; everything local goes through the kernel's gated calls.
The backward is exact on every rank: the local backward runs with the incoming state S_in and the
outgoing state's gradient dS_out, and the gate's gradient gets the final-state term from S_out.
"""

import torch
from torch import Tensor

from lasp.kernels.protocol import GatedKernel


def pack_pairs(D_nBHG: Tensor, M_nBHKV: Tensor) -> Tensor:
    """(D [n, B, H, Kg], M [n, B, H, K, V]) -> one buffer [n, B, H, K*V + Kg] to all-gather."""
    return torch.cat([M_nBHKV.flatten(-2), D_nBHG.to(M_nBHKV.dtype)], dim=-1)


def unpack_pairs(x: Tensor, K: int, V: int) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_pairs` on any leading dims -> (D [..., Kg, 1] as a row transition, M [..., K, V])."""
    return x[..., K * V :, None], x[..., : K * V].unflatten(-1, (K, V))


def combine_pairs(later: tuple[Tensor, Tensor], earlier: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(D2, M2) o (D1, M1) = (D2 D1, D2 M1 + M2): two consecutive chunks' affine maps as one (D [..., Kg, 1]
    row transitions, M [..., K, V]). Associative, so any grouping of a scan gives the same states; a chunk
    holding a document start has D = 0 and drops everything before it."""
    (D2, M2), (D1, M1) = later, earlier
    return D2 * D1, D2 * M1 + M2


class GatedChunks:
    """One rank's chunks [n*B, L, H, *] (chunk-major on the batch dim) with their gate [n*B, L, H, Kg]."""

    def __init__(self, kernel: GatedKernel, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, scale: float):
        self.kernel, self.q, self.k, self.v, self.gate, self.scale = kernel, q, k, v, gate, scale

    def pairs(self) -> tuple[Tensor, Tensor]:
        """(D [n*B, H, Kg], M [n*B, H, K, V]) of every chunk, in the state dtype."""
        return self.kernel.gated_chunk_state(self.k, self.v, self.gate)

    def intra(self) -> Tensor:
        """The output from a zero incoming state."""
        return self.kernel.gated_fwd(self.q, self.k, self.v, self.gate, self.scale, None, False)[0]

    def inter(self, s_in: Tensor) -> Tensor:
        """The incoming states' term of the output."""
        return self.kernel.gated_inter_fwd(self.q, self.gate, s_in, self.scale)

    def inter_bwd(self, s_in: Tensor, do: Tensor) -> tuple[Tensor, Tensor]:
        """(dq of the incoming states' term, N: the output's gradient w.r.t. each incoming state)."""
        return self.kernel.gated_inter_bwd(self.q, self.gate, s_in, self.scale, do)

    def intra_bwd(self, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of `intra`."""
        return self.kernel.gated_bwd(self.q, self.k, self.v, self.gate, self.scale, None, do, None)[:3]

    def finish_bwd(self, intra: tuple[Tensor, Tensor, Tensor], dq_inter: Tensor, dS_out: Tensor,
                   S_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every gradient of the chunks, (dq, dk, dv, dgate) in the inputs' dtypes, from the intra part, the
        incoming state's dq, and the outgoing states with their gradients."""
        dq_i, dk_i, dv_i = intra
        dk_s, dv_s = self.kernel.gated_chunk_state_bwd(self.k, self.v, self.gate, dS_out)
        dt = dq_inter.dtype
        dq, dk, dv = dq_i.to(dt) + dq_inter, dk_i.to(dt) + dk_s, dv_i.to(dt) + dv_s
        dg = self.kernel.gate_grad(self.q, self.k, dq, dk, self.gate, dS_out, S_out)
        return dq.to(self.q.dtype), dk.to(self.k.dtype), dv.to(self.v.dtype), dg.to(self.gate.dtype)
