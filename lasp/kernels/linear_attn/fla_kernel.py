"""FlaKernel: the kernel protocol over flash-linear-attention's chunk ops (fla-core, pinned), for CUDA GPUs.

One of fla's ops per form: `chunk_simple_gla` (no decay, a constant decay as `g_gamma`, a scalar gate), `chunk_gla`
(a vector gate), `chunk_delta_rule`, `chunk_gated_delta_rule` and `chunk_kda` (the delta rule without a gate, with
a scalar and with a vector gate). Each protocol call is that op on chosen inputs, and its backward the same call
run again under autograd (fla's own backward):

    fwd, gated_fwd, delta_fwd              the op from the initial state
    chunk_state (M, from a zero start)     the op's final state with q = 0 and no initial state
    intra_fwd (o from a zero start)        the op with no initial state
    inter_fwd (the incoming state's term)  the op with k = v = 0 from the state (its decay or gates still act)
    the delta rule's transition A          the op's final state with v = 0 from I (the K x K identity as a state)
    the delta rule's Qm (o's term in S)    the op's output with v = 0 from I

fla has no separate call for these pieces, so each costs one op, and its backward one more forward and backward.
The gate's product over a chunk and the gate's gradient from dq and dk are plain tensor math (lasp's own).
fla's kernels run on CUDA only, not on CPU, not even in Triton's interpreter: `get_kernel("fla")` refuses a
machine without a GPU, and the CPU tests give `FlaKernel` reference ops with fla's signatures instead.
Document starts (a gate of -inf) are not passed to fla (its chunk ops take packed documents as `cu_seqlens`,
not as gates): `caps.resets` is False, so they are refused by name.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lasp.kernels.linear_attn import gated
from lasp.kernels.protocol import Capabilities, state_dtype


@dataclass(frozen=True)
class FlaOps:
    """fla's chunk ops (or stand-ins with their signatures): each takes q, k, v [B, T, H, K|V] (and its gate
    and beta), `scale`, `initial_state` [B, H, K, V], `output_final_state` and returns (o, final state)."""

    simple_gla: Callable  # (q, k, v, g=[B,T,H] | None, g_gamma=[H] | None, ...)
    gla: Callable  # (q, k, v, g=[B,T,H,K], ...)
    delta_rule: Callable  # (q, k, v, beta=[B,T,H], ...)
    gated_delta_rule: Callable  # (q, k, v, g=[B,T,H], beta, ...)
    kda: Callable  # (q, k, v, g=[B,T,H,K], beta, ...)


def fla_ops() -> FlaOps:
    """The installed fla-core's chunk ops (imports Triton kernels: for a CUDA machine)."""
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.kda import chunk_kda
    from fla.ops.simple_gla import chunk_simple_gla

    return FlaOps(chunk_simple_gla, chunk_gla, chunk_delta_rule, chunk_gated_delta_rule, chunk_kda)


def _vjp(fn, inputs: list, grads: list) -> list:
    """The gradients of `fn(*inputs)` (a tuple of outputs) for output gradients `grads` (None: not used), with
    respect to every input tensor; zeros for an input that does not reach a used output, None for a None."""
    with torch.enable_grad():
        xs = [None if x is None else x.detach().requires_grad_() for x in inputs]
        outs = fn(*xs)
        used = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
        live = [x for x in xs if x is not None]
        got = iter(torch.autograd.grad([o for o, _ in used], live, [g.to(o.dtype) for o, g in used], allow_unused=True))
    out = []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        g = next(got)
        out.append(torch.zeros_like(x) if g is None else g)
    return out


class FlaKernel:
    """`LinearAttnKernel`, `GatedKernel` and the delta rule's calls on fla's chunk ops (module doc)."""

    name = "fla"
    caps = Capabilities(gates=("scalar", "vector"), resets=False, delta=True)

    def __init__(self, ops: FlaOps | None = None):
        self.ops = fla_ops() if ops is None else ops

    # one op for every form
    def run(self, q, k, v, *, log_decay=None, gate=None, beta=None, scale, s0=None, want_final=False):
        """(o, final state or None) of causal linear attention of the form the arguments give; the gate in
        lasp's vector form [B, T, H, Kg] (Kg = 1: a scalar gate)."""
        kw = dict(scale=scale, initial_state=s0, output_final_state=want_final)
        scalar = gate is not None and gate.shape[-1] == 1
        g = None if gate is None else (gate[..., 0] if scalar else gate)
        if beta is None:
            if gate is None:
                o, final = self.ops.simple_gla(q, k, v, g_gamma=log_decay, **kw)
            elif scalar:
                o, final = self.ops.simple_gla(q, k, v, g=g, **kw)
            else:
                o, final = self.ops.gla(q, k, v, g=g, **kw)
        elif gate is None:
            o, final = self.ops.delta_rule(q, k, v, beta=beta, **kw)
        elif scalar:
            o, final = self.ops.gated_delta_rule(q, k, v, g=g, beta=beta, **kw)
        else:
            o, final = self.ops.kda(q, k, v, g=g, beta=beta, **kw)
        sdt = state_dtype(q.dtype)
        return o.to(q.dtype), (final.to(sdt) if want_final else None)

    @staticmethod
    def _zeros_v(k: Tensor, width: int) -> Tensor:
        return k.new_zeros(*k.shape[:3], width)

    @staticmethod
    def _identity(q: Tensor) -> Tensor:
        B, _, H, K = q.shape
        return torch.eye(K, dtype=state_dtype(q.dtype), device=q.device).expand(B, H, K, K).contiguous()

    # the plain forms (no decay, a constant decay)
    def fwd(self, q, k, v, log_decay, scale, initial_state, want_final):
        return self.run(q, k, v, log_decay=log_decay, scale=scale, s0=initial_state, want_final=want_final)

    def bwd(self, q, k, v, log_decay, scale, initial_state, do, dfinal):
        def f(q, k, v, s0):
            return self.run(q, k, v, log_decay=log_decay, scale=scale, s0=s0, want_final=dfinal is not None)

        return tuple(_vjp(f, [q, k, v, initial_state], [do, dfinal]))

    def chunk_state(self, k, v, log_decay):
        return self.run(torch.zeros_like(k), k, v, log_decay=log_decay, scale=1.0, want_final=True)[1]

    def chunk_state_bwd(self, k, v, log_decay, dstate):
        def f(k, v):
            return (self.chunk_state(k, v, log_decay),)

        return tuple(_vjp(f, [k, v], [dstate]))

    def intra_fwd(self, q, k, v, log_decay, scale):
        return self.run(q, k, v, log_decay=log_decay, scale=scale)[0]

    def intra_bwd(self, q, k, v, log_decay, scale, do):
        return tuple(_vjp(lambda q, k, v: (self.intra_fwd(q, k, v, log_decay, scale),), [q, k, v], [do]))

    def inter_fwd(self, q, state, log_decay, scale):
        zk, zv = torch.zeros_like(q), self._zeros_v(q, state.shape[-1]).to(q.dtype)
        return self.run(q, zk, zv, log_decay=log_decay, scale=scale, s0=state)[0]

    def inter_bwd(self, q, state, log_decay, scale, do):
        return tuple(_vjp(lambda q, s: (self.inter_fwd(q, s, log_decay, scale),), [q, state], [do]))

    def chunk_decay(self, log_decay, length):
        return None if log_decay is None else torch.exp(log_decay.to(torch.float64) * length)

    # data-dependent gates
    def gated_fwd(self, q, k, v, gate, scale, initial_state, want_final):
        return self.run(q, k, v, gate=gate, scale=scale, s0=initial_state, want_final=want_final)

    def gated_bwd(self, q, k, v, gate, scale, initial_state, do, dfinal):
        def f(q, k, v, g, s0):
            return self.run(q, k, v, gate=g, scale=scale, s0=s0, want_final=dfinal is not None)

        return tuple(_vjp(f, [q, k, v, gate, initial_state], [do, dfinal]))

    def gated_chunk_state(self, k, v, gate):
        D = torch.exp(gate.to(state_dtype(k.dtype)).sum(1))  # the gate's product over the chunk, [B, H, Kg]
        return D, self.run(torch.zeros_like(k), k, v, gate=gate, scale=1.0, want_final=True)[1]

    def gated_chunk_state_bwd(self, k, v, gate, dstate):
        def f(k, v):
            return (self.run(torch.zeros_like(k), k, v, gate=gate, scale=1.0, want_final=True)[1],)

        return tuple(_vjp(f, [k, v], [dstate]))

    def gated_inter_fwd(self, q, gate, state, scale):
        zk, zv = torch.zeros_like(q), self._zeros_v(q, state.shape[-1]).to(q.dtype)
        return self.run(q, zk, zv, gate=gate, scale=scale, s0=state)[0]

    def gated_inter_bwd(self, q, gate, state, scale, do):
        return tuple(_vjp(lambda q, s: (self.gated_inter_fwd(q, gate, s, scale),), [q, state], [do]))

    def gate_grad(self, q, k, dq, dk, gate, dfinal, final):
        return gated.gate_grad(q, k, dq, dk, gate, dfinal, final)

    # the delta rule
    def delta_fwd(self, q, k, v, beta, g, scale, s0):
        o, final = self.run(q, k, v, gate=g, beta=beta, scale=scale, s0=s0, want_final=True)
        return o, final, q.new_empty(0)  # nothing kept: the backward runs the op again

    def delta_bwd(self, q, k, v, beta, g, scale, s0, do, dfinal, want_ds0, saved=None):
        def f(q, k, v, b, g, s):
            return self.run(q, k, v, gate=g, beta=b, scale=scale, s0=s, want_final=dfinal is not None)

        dq, dk, dv, db, dg, ds0 = _vjp(f, [q, k, v, beta, g, s0], [do, dfinal])
        return dq, dk, dv, db, dg, (ds0 if want_ds0 else None)

    def delta_transitions(self, q, k, v, beta, g, scale):
        """(A [B, H, K, K], M [B, H, K, V], what delta_outputs needs) of a chunk."""
        eye = self._identity(q)
        A = self.run(
            torch.zeros_like(q),
            k,
            self._zeros_v(k, k.shape[-1]),
            gate=g,
            beta=beta,
            scale=scale,
            s0=eye,
            want_final=True,
        )[1]
        M = self.run(torch.zeros_like(q), k, v, gate=g, beta=beta, scale=scale, want_final=True)[1]
        return A, M, (q, k, v, beta, g, scale)

    def delta_outputs(self, rest):
        """(o0: the output from a zero start, Qm [B, T, H, K]: the output's term in the incoming state)."""
        q, k, v, beta, g, scale = rest
        o0 = self.run(q, k, v, gate=g, beta=beta, scale=scale)[0]
        Qm = self.run(
            q.to(state_dtype(q.dtype)),
            k.to(state_dtype(q.dtype)),
            self._zeros_v(k, k.shape[-1]).to(state_dtype(q.dtype)),
            gate=g,
            beta=beta.to(state_dtype(q.dtype)),
            scale=scale,
            s0=self._identity(q),
        )[0]
        return o0, Qm
