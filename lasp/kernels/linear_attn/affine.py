"""One rank's chunks of linear attention as affine maps of their incoming states, for every form.

Legend: n chunks (of one rank), B batch, L chunk length, H heads, K key dim, V value dim.

A chunk c maps its incoming state to its outgoing one, and its output is affine in the incoming state too
(docs/lasp2.md, "The affine-map core"):

    S_out = A_c S_in + M_c            o = o_0 + (the incoming state's term, linear in S_in)

Only the kind of A_c differs between the forms (lasp.kernels.scan has the kinds and their algebra); a
document start inside a chunk makes A_c = 0. A `ChunkMaps` holds one form's chunks: their pairs
(A_c, M_c), the zero-start output (computed while the SP method's messages are in flight), the output
from the incoming states, and the backward pieces. Pairs stay in the state dtype (float32 for bf16
inputs). Nothing here knows of ranks: lasp.sp.core moves the pairs.
"""

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lasp.kernels.protocol import GatedKernel, LinearAttnKernel


class ChunkMaps(ABC):
    """One rank's chunks [n*B, L, H, *] (chunk-major on the batch dim) of one form, as affine maps.

    Forward: `pairs`, then `zero_start` (while the pairs travel), then `output` from the incoming states.
    Backward (on an object rebuilt by `restore` from `saved`): `state_grad` (N = d loss / d S_in through the
    output), `local_bwd` (while N travels), then `grads` from the outgoing states' gradients.
    """

    fields: tuple[str, ...] = ()
    """The tensors the backward needs (saved with ctx.save_for_backward)."""
    uniform = False
    """Every chunk of every rank has the same transition (constant decay): it need not travel."""

    def saved(self) -> list[Tensor | None]:
        return [getattr(self, f) for f in self.fields]

    def restore(self, tensors) -> "ChunkMaps":
        for f, t in zip(self.fields, tensors):
            setattr(self, f, t)
        return self

    def bare(self) -> "ChunkMaps":
        """A copy without tensors (the settings the backward rebuilds from), to keep on the autograd context."""
        new = object.__new__(type(self))
        new.__dict__ = {k: x for k, x in self.__dict__.items() if not isinstance(x, (Tensor, tuple, list))}
        return new

    @abstractmethod
    def pairs(self) -> tuple[Tensor | None, Tensor]:
        """(A [n*B, H, a, b] or None, M [n*B, H, K, V]) of every chunk, in the state dtype."""

    @abstractmethod
    def zero_start(self) -> None:
        """The output from a zero incoming state (kept for `output`)."""

    @abstractmethod
    def output(self, s_in: Tensor) -> Tensor:
        """The chunks' output [n*B, L, H, V] given each chunk's incoming state [n*B, H, K, V]."""

    @abstractmethod
    def state_grad(self, do: Tensor) -> Tensor:
        """N [n*B, H, K, V]: the output's gradient w.r.t. each chunk's incoming state."""

    def local_bwd(self, do: Tensor) -> None:
        """The backward of the zero-start output (kept for `grads`); nothing by default (the delta rule does it
        all in `grads`)."""

    @abstractmethod
    def grads(self, ds_out: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(dq, dk, dv, dgate or None, dbeta or None) in the inputs' dtypes, given each chunk's outgoing
        state gradient."""


class PlainMaps(ChunkMaps):
    """No gate: A is lambda^L per head (constant decay), the identity without decay, and the identity in
    the bidirectional form, where every chunk sees the total (lasp.sp.core sums instead of scanning)."""

    fields = ("q", "k", "v", "log_decay", "s_in")

    def __init__(self, kernel: LinearAttnKernel, q, k, v, log_decay: Tensor | None, scale: float, causal: bool):
        self.kernel, self.q, self.k, self.v, self.scale, self.causal = kernel, q, k, v, scale, causal
        self.log_decay = log_decay
        self.uniform = log_decay is not None

    def pairs(self):
        M = self.kernel.chunk_state(self.k, self.v, self.log_decay)
        decay = self.kernel.chunk_decay(self.log_decay, self.q.shape[1])
        return (None if decay is None else decay.to(M.dtype).view(1, -1, 1, 1).expand(M.shape[0], -1, 1, 1)), M

    def zero_start(self):
        self.o0 = self.kernel.intra_fwd(self.q, self.k, self.v, self.log_decay, self.scale) if self.causal else None

    def output(self, s_in):
        self.s_in = s_in
        o = self.kernel.inter_fwd(self.q, s_in, self.log_decay, self.scale)
        return o if self.o0 is None else self.o0 + o

    def state_grad(self, do):
        self.dq, N = self.kernel.inter_bwd(self.q, self.s_in, self.log_decay, self.scale, do)
        return N

    def local_bwd(self, do):
        self.intra = (
            self.kernel.intra_bwd(self.q, self.k, self.v, self.log_decay, self.scale, do) if self.causal else None
        )

    def grads(self, ds_out, do):
        dk, dv = self.kernel.chunk_state_bwd(self.k, self.v, self.log_decay, ds_out)
        dq = self.dq
        if self.intra is not None:
            dq, dk, dv = dq + self.intra[0], dk + self.intra[1], dv + self.intra[2]
        return dq, dk, dv, None, None


class GatedMaps(ChunkMaps):
    """A data-dependent gate [n*B, L, H, Kg] (Kg = 1 scalar, K vector): A = Diag(D_c), the gate's product
    over the chunk. The gate's gradient takes the outgoing state S_out = D S_in + M too."""

    fields = ("q", "k", "v", "gate", "s_in", "s_out")

    def __init__(self, kernel: GatedKernel, q, k, v, gate: Tensor, scale: float):
        self.kernel, self.q, self.k, self.v, self.gate, self.scale = kernel, q, k, v, gate, scale

    def pairs(self):
        D, self.M = self.kernel.gated_chunk_state(self.k, self.v, self.gate)
        self.A = D[..., None].to(self.M.dtype)
        return self.A, self.M

    def zero_start(self):
        self.o0 = self.kernel.gated_fwd(self.q, self.k, self.v, self.gate, self.scale, None, False)[0]

    def output(self, s_in):
        self.s_in, self.s_out = s_in, self.A * s_in + self.M
        return self.o0 + self.kernel.gated_inter_fwd(self.q, self.gate, s_in, self.scale)

    def state_grad(self, do):
        self.dq, N = self.kernel.gated_inter_bwd(self.q, self.gate, self.s_in, self.scale, do)
        return N

    def local_bwd(self, do):
        self.intra = self.kernel.gated_bwd(self.q, self.k, self.v, self.gate, self.scale, None, do, None)[:3]

    def grads(self, ds_out, do):
        dq_i, dk_i, dv_i = self.intra
        dk_s, dv_s = self.kernel.gated_chunk_state_bwd(self.k, self.v, self.gate, ds_out)
        dt = self.dq.dtype
        dq, dk, dv = dq_i.to(dt) + self.dq, dk_i.to(dt) + dk_s, dv_i.to(dt) + dv_s
        dg = self.kernel.gate_grad(self.q, self.k, dq, dk, self.gate, ds_out, self.s_out)
        return dq.to(self.q.dtype), dk.to(self.k.dtype), dv.to(self.v.dtype), dg.to(self.gate.dtype), None


class DeltaMaps(ChunkMaps):
    """The delta rule (beta [n*B, L, H], the gate [n*B, L, H, Kg] or None): a K x K transition A, and the
    output o = o_0 + Qm S_in (the kernel's delta_transitions, then delta_outputs while the pairs travel)."""

    fields = ("q", "k", "v", "beta", "gate", "s_in", "Qm")

    def __init__(self, kernel, q, k, v, beta: Tensor, gate: Tensor | None, scale: float):
        self.kernel, self.q, self.k, self.v, self.beta, self.gate, self.scale = kernel, q, k, v, beta, gate, scale

    def pairs(self):
        A, M, self._rest = self.kernel.delta_transitions(self.q, self.k, self.v, self.beta, self.gate, self.scale)
        return A, M

    def zero_start(self):
        self.o0, self.Qm = self.kernel.delta_outputs(self._rest)

    def output(self, s_in):
        self.s_in = s_in
        return (self.o0 + torch.einsum("bthk,bhkv->bthv", self.Qm, s_in)).to(self.q.dtype)

    def state_grad(self, do):
        return torch.einsum("bthk,bthv->bhkv", self.Qm, do.to(self.Qm.dtype))

    def grads(self, ds_out, do):
        dq, dk, dv, db, dg, _ = self.kernel.delta_bwd(
            self.q, self.k, self.v, self.beta, self.gate, self.scale, self.s_in, do, ds_out, False
        )
        return dq, dk, dv, dg, db


def chunk_maps(
    kernel,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_decay: Tensor | None = None,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float,
    causal: bool = True,
) -> ChunkMaps:
    """The maps of one form: the delta rule with `beta` (gate or not), a gate [.., H, Kg], else plain."""
    if beta is not None:
        return DeltaMaps(kernel, q, k, v, beta, gate, scale)
    if gate is not None:
        return GatedMaps(kernel, q, k, v, gate, scale)
    return PlainMaps(kernel, q, k, v, log_decay, scale, causal)
