"""The kernel protocol: what an SP algorithm may ask of a single-device linear-attention kernel.

Legend: B batch, T tokens of one chunk, H heads, K key dim, V value dim.

A rank's local sequence is cut into chunks. For a chunk of length L with log-decay g (lambda = exp(g)):

    chunk_state:  M     = sum_j lambda^(L-1-j) k_j v_j^T                          (zero start)
    intra_fwd:    o_t   = s * sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j              (zero start)
    inter_fwd:    o_t   = s * lambda^(t+1) q_t^T S                                  (from state S)
    chunk_decay:  D     = lambda^L

and the backward of each. Every SP algorithm is written against these six calls plus chunk_decay, so a
faster kernel (Triton) drops in without touching `lasp.sp`. Kernels never see ranks or process groups.
`fwd` / `bwd` are single-device causal attention over all of T with an optional initial state and final
state (what `linear_attn` calls): `ComposedStates` builds them from the six calls, and a kernel may fuse
them instead (the Triton kernel starts its state walks from the states).

Dtypes: activations and their gradients come back in the input dtype; states (M, S, dS) are float32, or
float64 when the inputs are float64 (see `state_dtype`).
"""

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Capabilities:
    """What a kernel computes beyond the plain form (constant decay or none); `linear_attn`, the SP ops and
    the trainer refuse the rest by name before any work."""

    gates: tuple[str, ...] = ()
    """The gate forms it has: "scalar" ([B,T,H,1]), "vector" ([B,T,H,K])."""
    resets: bool = False
    """A gate of -inf (a document start) works."""
    delta: bool = False
    """The delta rule (beta): delta_fwd, delta_bwd, delta_transitions, delta_outputs."""


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and cross-chunk scans are kept in for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearAttnKernel(Protocol):
    """Single-device building blocks of chunked linear attention (causal unless stated)."""

    name: str
    caps: Capabilities

    def chunk_state(self, k: Tensor, v: Tensor, log_decay: Tensor | None) -> Tensor:
        """k [B,T,H,K], v [B,T,H,V] -> M [B,H,K,V]: the chunk's state from a zero start."""
        ...

    def chunk_state_bwd(self, k: Tensor, v: Tensor, log_decay: Tensor | None, dstate: Tensor) -> tuple[Tensor, Tensor]:
        """dstate [B,H,K,V] (gradient w.r.t. M) -> (dk [B,T,H,K], dv [B,T,H,V])."""
        ...

    def intra_fwd(self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, scale: float) -> Tensor:
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

    def fwd(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_decay: Tensor | None,
        scale: float,
        initial_state: Tensor | None,
        want_final: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Causal attention over T from `initial_state` [B,H,K,V] (None: zero) -> (o, final state or None)."""
        ...

    def bwd(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_decay: Tensor | None,
        scale: float,
        initial_state: Tensor | None,
        do: Tensor,
        dfinal: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(dq, dk, dv, d initial_state or None) of `fwd`, given do and the final state's gradient (or None)."""
        ...


class GatedKernel(Protocol):
    """What a kernel adds for data-dependent gates (lasp.kernels.linear_attn.gated has the math), for the
    forms its `caps.gates` names; heads are expanded. A gate of -inf (on every key dim) is a document start
    (with `caps.resets`): the state resets there, and its gate's gradient is 0."""

    def gated_fwd(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        scale: float,
        initial_state: Tensor | None,
        want_final: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Causal gated attention over T from `initial_state` -> (o, final state or None)."""
        ...

    def gated_bwd(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        scale: float,
        initial_state: Tensor | None,
        do: Tensor,
        dfinal: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """(dq, dk, dv, dgate, d initial_state or None) of `gated_fwd`."""
        ...

    # For LASP-2: a chunk as an affine map of its state, S_out = Diag(D) S_in + M, and its pieces apart.
    def gated_chunk_state(self, k: Tensor, v: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
        """-> (D [B, H, Kg], M [B, H, K, V] from a zero start)."""
        ...

    def gated_chunk_state_bwd(self, k: Tensor, v: Tensor, gate: Tensor, dstate: Tensor) -> tuple[Tensor, Tensor]:
        """dM -> (dk, dv)."""
        ...

    def gated_inter_fwd(self, q: Tensor, gate: Tensor, state: Tensor, scale: float) -> Tensor:
        """The incoming state's term of the output."""
        ...

    def gated_inter_bwd(
        self, q: Tensor, gate: Tensor, state: Tensor, scale: float, do: Tensor
    ) -> tuple[Tensor, Tensor]:
        """-> (dq, d state)."""
        ...

    def gate_grad(
        self,
        q: Tensor,
        k: Tensor,
        dq: Tensor,
        dk: Tensor,
        gate: Tensor,
        dfinal: Tensor | None,
        final: Tensor | None,
    ) -> Tensor:
        """The gate's gradient from the chunk's total dq, dk and its final state's gradient."""
        ...


class ComposedStates:
    """`fwd` / `bwd` of a kernel from its six protocol calls: intra + inter for the output, chunk_state
    plus the decayed initial state for the final state, and the backward of each."""

    def fwd(self, q, k, v, log_decay, scale, initial_state, want_final):
        sdt = state_dtype(q.dtype)
        o = self.intra_fwd(q, k, v, log_decay, scale)
        if initial_state is not None:
            o = o + self.inter_fwd(q, initial_state, log_decay, scale)
        if not want_final:
            return o, None
        final = self.chunk_state(k, v, log_decay).to(sdt)
        if initial_state is not None:
            decay = self.chunk_decay(log_decay, q.shape[1])
            final = final + (initial_state if decay is None else initial_state * decay.to(sdt).view(-1, 1, 1))
        return o, final

    def bwd(self, q, k, v, log_decay, scale, initial_state, do, dfinal):
        dq, dk, dv = self.intra_bwd(q, k, v, log_decay, scale, do)
        ds0 = None
        if initial_state is not None:
            dq_s, ds0 = self.inter_bwd(q, initial_state, log_decay, scale, do)
            dq = dq + dq_s
        if dfinal is not None:
            dk_f, dv_f = self.chunk_state_bwd(k, v, log_decay, dfinal)
            dk, dv = dk + dk_f, dv + dv_f
            if ds0 is not None:
                decay = self.chunk_decay(log_decay, q.shape[1])
                dfs = dfinal.to(ds0.dtype)
                ds0 = ds0 + (dfs if decay is None else dfs * decay.to(ds0.dtype).view(-1, 1, 1))
        return dq, dk, dv, ds0
