"""The kernel protocol: what an SP algorithm may ask of a single-device linear-attention kernel.

Legend: B batch, T tokens of one chunk, H heads, K key dim, V value dim.

A rank's local sequence is cut into chunks. For a chunk of length L with log-decay g (lambda = exp(g)):

    chunk_state:  M     = sum_j lambda^(L-1-j) k_j v_j^T                          (zero start)
    intra_fwd:    o_t   = s * sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j              (zero start)
    inter_fwd:    o_t   = s * lambda^(t+1) q_t^T S                                  (from state S)
    chunk_decay:  D     = lambda^L

and the backward of each. Every SP algorithm is written against these six calls plus chunk_decay, so a
faster kernel (Triton) drops in without touching `lasp.sp`. Kernels never see ranks or process groups.

Dtypes: activations and their gradients come back in the input dtype; states (M, S, dS) are float32, or
float64 when the inputs are float64 (see `state_dtype`).
"""

from typing import Protocol

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and cross-chunk scans are kept in for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearAttnKernel(Protocol):
    """Single-device building blocks of chunked linear attention (causal unless stated)."""

    name: str

    def chunk_state(self, k: Tensor, v: Tensor, log_decay: Tensor | None) -> Tensor:
        """k [B,T,H,K], v [B,T,H,V] -> M [B,H,K,V]: the chunk's state from a zero start."""
        ...

    def chunk_state_bwd(
        self, k: Tensor, v: Tensor, log_decay: Tensor | None, dstate: Tensor
    ) -> tuple[Tensor, Tensor]:
        """dstate [B,H,K,V] (gradient w.r.t. M) -> (dk [B,T,H,K], dv [B,T,H,V])."""
        ...

    def intra_fwd(
        self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, scale: float
    ) -> Tensor:
        """Causal linear attention over the chunk from a zero state -> o [B,T,H,V]."""
        ...

    def intra_bwd(
        self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, scale: float, do: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """do [B,T,H,V] -> (dq, dk, dv) of `intra_fwd`."""
        ...

    def inter_fwd(self, q: Tensor, state: Tensor, log_decay: Tensor | None, scale: float) -> Tensor:
        """q [B,T,H,K], state [B,H,K,V] -> o [B,T,H,V], the contribution of an incoming state."""
        ...

    def inter_bwd(
        self, q: Tensor, state: Tensor, log_decay: Tensor | None, scale: float, do: Tensor
    ) -> tuple[Tensor, Tensor]:
        """do [B,T,H,V] -> (dq [B,T,H,K], dstate [B,H,K,V]) of `inter_fwd`."""
        ...

    def chunk_decay(self, log_decay: Tensor | None, length: int) -> Tensor | None:
        """lambda^length per head [H] in the state dtype (None when there is no decay)."""
        ...
