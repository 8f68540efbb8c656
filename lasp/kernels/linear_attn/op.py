"""`linear_attn`: single-device linear attention with its own backward, built on the kernel protocol.

Legend: B batch, T tokens, H heads (of q), Hkv heads of k and v, K key dim, V value dim.
"""

import torch
from torch import Tensor

from lasp.kernels.checks import check_causal, check_qkv, check_scale
from lasp.kernels.documents import Documents, as_documents
from lasp.kernels.linear_attn.chunk import TorchChunkKernel
from lasp.kernels.linear_attn.gated import as_vector_form
from lasp.kernels.linear_attn.product import run_product
from lasp.kernels.protocol import LinearAttnKernel, state_dtype

DEFAULT_KERNEL: LinearAttnKernel = TorchChunkKernel()


def _check_decay_values(log_decay: Tensor) -> None:
    """Finite and <= 0, read at every call: on a GPU this is one small device-to-host read. (No cache:
    a write through `.data` does not bump the tensor's version, so a cache keyed on it could be fooled.)"""
    if not bool(torch.isfinite(log_decay).all()) or bool((log_decay > 0).any()):
        raise ValueError(f"log_decay must be finite and <= 0 (decay in (0, 1]), got {log_decay.tolist()}")


def check_linear_attn_args(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, causal: bool, scale: float | None
) -> tuple[Tensor, Tensor, float]:
    """Validate the shared arguments of every linear-attention op; return (k, v, scale).

    k and v with fewer heads than q (GQA / MQA) are repeated to q's heads here, so autograd sums
    their gradients back over each group.
    """
    check_qkv(q, k, v)
    causal = check_causal(causal)
    H, Hkv = q.shape[2], k.shape[2]
    if log_decay is not None:
        if not isinstance(log_decay, Tensor):
            raise TypeError(
                f"log_decay must be a tensor of shape [H] = [{H}] (one log-decay <= 0 per head) or None, got "
                f"{type(log_decay).__name__} {log_decay!r}"
            )
        if not causal:
            raise ValueError("decay needs causal=True: bidirectional linear attention has no decay")
        if tuple(log_decay.shape) != (H,):
            raise ValueError(f"log_decay must have shape [H] = [{H}], got {tuple(log_decay.shape)}")
        if not log_decay.dtype.is_floating_point:
            raise ValueError(f"log_decay must be a floating-point tensor, got {log_decay.dtype}")
        if log_decay.device != q.device:
            raise ValueError(f"log_decay is on {log_decay.device} but q is on {q.device}")
        if log_decay.requires_grad:
            raise ValueError("log_decay is a fixed per-head constant here; pass it detached (no grad)")
        _check_decay_values(log_decay)
    scale = check_scale(scale, q.shape[-1])
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    return k, v, scale


def gate_form(gate: Tensor) -> str:
    """ "scalar" ([B, T, H]) or "vector" ([B, T, H, K])."""
    return "scalar" if gate.dim() == 3 else "vector"


def _per_token_problems(
    name: str, x: Tensor, q: Tensor, log_decay: Tensor | None, causal: bool, no_decay: str, not_causal: str
) -> list[str]:
    """What a per-token argument (the gate, beta) shares: floating, on q's device, not with log_decay
    (`no_decay` says so) and causal only (`not_causal` says so)."""
    problems = []
    if not x.dtype.is_floating_point:
        problems.append(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device != q.device:
        problems.append(f"{name} is on {x.device} but q is on {q.device}")
    if log_decay is not None:
        problems.append(no_decay)
    if not causal:
        problems.append(not_causal)
    return problems


def check_gate(gate, q: Tensor, log_decay: Tensor | None, causal: bool, kernel: LinearAttnKernel) -> None:
    """A log-gate: [B, T, H] (scalar per token and head) or [B, T, H, K] (vector over the key dim) of q's
    batch, length and heads, floating, on q's device, <= 0 and not NaN (one device-to-host read on a GPU;
    -inf, a gate of exactly 0, is a full reset, on all K of a token and head for a vector gate); not with
    log_decay, only causal, and a kernel that has this gate form."""
    if not isinstance(gate, Tensor):
        raise TypeError(
            f"gate must be a tensor [B, T, H] or [B, T, H, K] of log-gates <= 0, or None, got {type(gate).__name__}"
        )
    B, T, H, K = q.shape
    problems = []
    if tuple(gate.shape) not in ((B, T, H), (B, T, H, K)):
        problems.append(
            f"gate must be [B, T, H] = {[B, T, H]} (scalar) or [B, T, H, K] = {[B, T, H, K]} "
            f"(vector), got {list(gate.shape)}"
        )
    problems += _per_token_problems(
        "gate",
        gate,
        q,
        log_decay,
        causal,
        "give either log_decay (a constant per head) or gate (per token), not both",
        "a gate needs causal=True: bidirectional linear attention has no gate",
    )
    if not problems:
        wrong = torch.isnan(gate) | (gate > 0)
        if bool(wrong.any()):
            bad = gate[wrong]
            problems.append(
                f"gate values must be <= 0 and not NaN (log of a gate in [0, 1]); {bad.numel()} are "
                f"not, e.g. {bad.flatten()[:4].tolist()}"
            )
        reset = torch.isneginf(gate)
        has_reset = bool(reset.any())
        if has_reset and gate.dim() == 4:
            partial = reset.any(-1) != reset.all(-1)
            if bool(partial.any()):
                b, t, h = (int(i) for i in torch.nonzero(partial)[0])
                problems.append(
                    f"a vector gate of -inf (a reset) must be -inf on every key dim of its token and "
                    f"head; gate[{b}, {t}, {h}] is -inf on {int(reset[b, t, h].sum())} of {K}"
                )
        if has_reset and not kernel.caps.resets:
            problems.append(
                f"the {kernel.name!r} kernel has no reset (a gate of -inf, a document start); use the 'torch' backend"
            )
        if gate_form(gate) not in kernel.caps.gates:
            problems.append(
                f"the {kernel.name!r} kernel has no {gate_form(gate)} gate (it has: "
                f"{', '.join(kernel.caps.gates) or 'none'}); use the 'torch' backend"
            )
    if problems:
        raise ValueError("; ".join(problems))


def check_beta(beta, q: Tensor, log_decay: Tensor | None, causal: bool, kernel: LinearAttnKernel) -> None:
    """The delta rule's beta: [B, T, H] of q's batch, length and heads, floating, on q's device, each value
    in (0, 2] (2: negative eigenvalues; one device-to-host read on a GPU); only causal, not with log_decay
    (give a gate), and a kernel that has the delta rule. Every problem at once."""
    if not isinstance(beta, Tensor):
        raise TypeError(f"beta must be a tensor [B, T, H] of values in (0, 2], or None, got {type(beta).__name__}")
    B, T, H, _ = q.shape
    problems = []
    if tuple(beta.shape) != (B, T, H):
        problems.append(f"beta must be [B, T, H] = {[B, T, H]}, got {list(beta.shape)}")
    problems += _per_token_problems(
        "beta",
        beta,
        q,
        log_decay,
        causal,
        "the delta rule takes a per-token gate, not log_decay: pass gate=log_decay.expand(B, T, H)",
        "the delta rule needs causal=True",
    )
    if not kernel.caps.delta:
        problems.append(f"the {kernel.name!r} kernel has no delta rule (beta); use the 'torch' backend")
    if not problems:
        wrong = ~((beta > 0) & (beta <= 2))
        if bool(wrong.any()):
            bad = beta[wrong]
            problems.append(f"beta values must be in (0, 2]; {bad.numel()} are not, e.g. {bad.flatten()[:4].tolist()}")
    if problems:
        raise ValueError("; ".join(problems))


def check_initial_state(initial_state, q: Tensor, v: Tensor) -> None:
    """A state [B, H, K, V] of q's batch, heads and key dim and v's value dim, floating, on q's device."""
    want = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if not isinstance(initial_state, Tensor):
        raise TypeError(
            f"initial_state must be a tensor [B, H, K, V] = {list(want)} or None, got {type(initial_state).__name__}"
        )
    problems = []
    if tuple(initial_state.shape) != want:
        problems.append(f"initial_state must be [B, H, K, V] = {list(want)}, got {list(initial_state.shape)}")
    if not initial_state.dtype.is_floating_point:
        problems.append(f"initial_state must be a floating-point tensor, got {initial_state.dtype}")
    if initial_state.device != q.device:
        problems.append(f"initial_state is on {initial_state.device} but q is on {q.device}")
    if problems:
        raise ValueError("; ".join(problems))


def check_documents(cu_seqlens, q: Tensor, N: int, causal: bool, kernel: LinearAttnKernel) -> Documents:
    """`cu_seqlens` over rows of N tokens (the global length under SP) as `Documents`; resets need a causal
    call and a kernel with a scalar gate (they run as gates of 0). Every problem at once."""
    problems = []
    try:
        docs = as_documents(cu_seqlens, q.shape[0], N)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    if not causal:
        problems.append("cu_seqlens needs causal=True: bidirectional linear attention has no document resets")
    if "scalar" not in kernel.caps.gates or not kernel.caps.resets:
        problems.append(
            f"the {kernel.name!r} kernel has no document resets (they run as a scalar gate, which it "
            f"lacks); use the 'torch' backend"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return docs


def gate_with_resets(
    gate: Tensor | None, log_decay: Tensor | None, resets_BT: Tensor, H: int, dtype: torch.dtype
) -> Tensor:
    """The log-gate a call with document starts runs with: `gate` (else the constant decay, else 0, per
    head, [B, T, H] in `dtype`) with -inf (a gate of 0: the state resets) where `resets_BT` is True."""
    if gate is None:
        B, T = resets_BT.shape
        base = torch.zeros((), dtype=dtype, device=resets_BT.device) if log_decay is None else log_decay.to(dtype)
        gate = base.expand(B, T, H)
    mask = resets_BT[:, :, None] if gate.dim() == 3 else resets_BT[:, :, None, None]
    return gate.masked_fill(mask, -torch.inf)


class _GatedLinearAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, scale, initial_state, want_final, kernel):
        sdt = state_dtype(q.dtype)
        s0 = None if initial_state is None else initial_state.to(sdt)
        g = as_vector_form(gate)
        o, final = kernel.gated_fwd(q, k, v, g, scale, s0, want_final)
        ctx.save_for_backward(q, k, v, gate, s0)
        ctx.scale, ctx.kernel = scale, kernel
        ctx.s0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return (o, final) if want_final else o

    @staticmethod
    def backward(ctx, do, dfinal=None):
        q, k, v, gate, s0 = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
        dq, dk, dv, dg, ds0 = ctx.kernel.gated_bwd(q, k, v, as_vector_form(gate), ctx.scale, s0, do, dfinal)
        if ds0 is not None:
            ds0 = ds0.to(ctx.s0_dtype)
        return dq, dk, dv, dg.view(gate.shape), None, ds0, None, None


class _DeltaRuleFn(torch.autograd.Function):
    """The delta rule on one device: the kernel's delta_fwd -> (o, final state, what its backward keeps),
    and its delta_bwd for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, beta, gate, scale, initial_state, want_final, kernel):
        sdt = state_dtype(q.dtype)
        s0 = None if initial_state is None else initial_state.to(sdt)
        g = None if gate is None else as_vector_form(gate)
        o, final, saved = kernel.delta_fwd(q, k, v, beta, g, scale, s0)
        ctx.save_for_backward(q, k, v, beta, gate, s0, saved)
        ctx.scale, ctx.kernel = scale, kernel
        ctx.s0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        o = o.to(q.dtype)
        return (o, final) if want_final else o

    @staticmethod
    def backward(ctx, do, dfinal=None):
        q, k, v, beta, gate, s0, saved = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
        g = None if gate is None else as_vector_form(gate)
        dq, dk, dv, db, dg, ds0 = ctx.kernel.delta_bwd(
            q, k, v, beta, g, ctx.scale, s0, do, dfinal, s0 is not None, saved
        )
        if ds0 is not None:
            ds0 = ds0.to(ctx.s0_dtype)
        dg = None if dg is None else dg.view(gate.shape)
        return dq, dk, dv, db, dg, None, ds0, None, None


class _LinearAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, causal, initial_state, want_final, kernel):
        sdt = state_dtype(q.dtype)
        s0 = None if initial_state is None else initial_state.to(sdt)
        if causal:
            o, final = kernel.fwd(q, k, v, log_decay, scale, s0, want_final)
            saved_state = s0
        else:
            state = kernel.chunk_state(k, v, None)
            if s0 is not None:
                state = state + s0
            o = kernel.inter_fwd(q, state, None, scale)
            final = state if want_final else None
            saved_state = state
        ctx.save_for_backward(q, k, v, log_decay, saved_state)
        ctx.scale, ctx.causal, ctx.kernel = scale, causal, kernel
        ctx.has_s0 = initial_state is not None
        ctx.s0_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        if want_final:
            return o, final.to(sdt)
        return o

    @staticmethod
    def backward(ctx, do, dfinal=None):
        q, k, v, log_decay, state = ctx.saved_tensors
        kernel, scale = ctx.kernel, ctx.scale
        if do is None:
            do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
        ds0 = None
        if ctx.causal:
            dq, dk, dv, ds0 = kernel.bwd(q, k, v, log_decay, scale, state, do, dfinal)
        else:
            dq, dstate = kernel.inter_bwd(q, state, None, scale, do)
            if dfinal is not None:
                dstate = dstate + dfinal.to(dstate.dtype)
            dk, dv = kernel.chunk_state_bwd(k, v, None, dstate)
            ds0 = dstate if ctx.has_s0 else None
        if ds0 is not None:
            ds0 = ds0.to(ctx.s0_dtype)
        return dq, dk, dv, None, None, None, ds0, None, None


def linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_decay: Tensor | None = None,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel: LinearAttnKernel | None = None,
    cu_seqlens=None,
    householder: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Linear attention on one device (docs/design.md, "The math").

    q, k: [B, T, H, K] (k may have fewer heads, H % Hkv == 0); v: [B, T, Hkv, V]; log_decay: [H],
    values <= 0, or None; scale defaults to K**-0.5; initial_state: [B, H, K, V].
    Causal: o_t = s q_t^T S_t with S_t = lambda S_{t-1} + k_t v_t^T (the current token included).
    `gate` (instead of log_decay): data-dependent log-gates <= 0, [B, T, H] (a scalar per token and head:
    simple GLA, Mamba-2) or [B, T, H, K] (a vector over the key dim: GLA), with gradients:
    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T.
    A gate of -inf (a gate of exactly 0) resets the state.
    `beta` [B, T, H], values in (0, 2], selects the delta rule (flash-linear-attention's convention):
    S_t = (I - b_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + b_t k_t v_t^T, with no gate (DeltaNet), a gate
    [B, T, H] (Gated DeltaNet) or [B, T, H, K] (KDA); q and k are used as given (the layer L2-normalises
    them). Gradients flow to beta and the gate too.
    `cu_seqlens`: packed documents, [0, l1, l1 + l2, ..., T] for B = 1 or one such list per row, or a
    `lasp.kernels.documents.Documents`: the state resets at every document start (initial_state feeds the
    first document). It runs as a scalar gate of the decay (or 0) with -inf at the starts.
    `householder` n (DeltaProduct, with beta): each token applies n delta-rule steps, its gate once before
    them and its query once after; k, v, beta are [B, T * n, ...] (micro-step j of token t at row t * n + j,
    flash-linear-attention's layout), q and the gate [B, T, ...], cu_seqlens over the T tokens
    (lasp.kernels.linear_attn.product).
    Bidirectional (causal=False): o = s q (S0 + sum over all tokens of k v^T); no decay.
    Returns o [B, T, H, V], plus the final state [B, H, K, V] (float32, or float64 for float64
    inputs) when `output_final_state`.
    """
    if householder is not None:
        return run_product(
            linear_attn,
            q,
            k,
            v,
            householder,
            length=q.shape[1],
            log_decay=log_decay,
            gate=gate,
            beta=beta,
            causal=causal,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            kernel=kernel,
            cu_seqlens=cu_seqlens,
        )
    k, v, scale = check_linear_attn_args(q, k, v, log_decay, causal, scale)
    if initial_state is not None:
        check_initial_state(initial_state, q, v)
    kernel = DEFAULT_KERNEL if kernel is None else kernel
    docs = None if cu_seqlens is None else check_documents(cu_seqlens, q, q.shape[1], causal, kernel)
    if gate is not None:
        check_gate(gate, q, log_decay, causal, kernel)
    if beta is not None:
        check_beta(beta, q, log_decay, causal, kernel)
    if docs is not None and docs.has_resets:
        gate = gate_with_resets(gate, log_decay, docs.resets(q.device), q.shape[2], state_dtype(q.dtype))
    if beta is not None:
        return _DeltaRuleFn.apply(q, k, v, beta, gate, scale, initial_state, output_final_state, kernel)
    if gate is not None:
        return _GatedLinearAttnFn.apply(q, k, v, gate, scale, initial_state, output_final_state, kernel)
    return _LinearAttnFn.apply(q, k, v, log_decay, scale, causal, initial_state, output_final_state, kernel)
