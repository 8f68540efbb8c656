"""The shared entries of the sequence-parallel ops: validate before any communication, pick the layout,
fall back to the single-device op on a group of one, agree with the other ranks, else dispatch.

Rank agreement (lasp.distributed.agree): every op's fingerprint holds the local length, the shapes, the
dtype, the layout, causal, the scale and (linear ops) a digest of the decay, the gate's form and whether
it is the delta rule. LASP-2 and LASP-2H carry it in
the buffer they all-gather anyway; LASP-1, Ring and Ulysses, whose collectives carry no such buffer,
exchange it in one small all-gather per call. A rank whose own arguments are wrong tells the others
before raising, so that every rank stops. `check_ranks=False` skips all of it (benchmarks); then ranks
that disagree compute wrong results or hang, as they would in any collective code.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lasp.distributed import group_rank, group_size
from lasp.distributed.agree import Fingerprint, agree, refuse
from lasp.kernels import DEFAULT_KERNEL, LinearAttnKernel, linear_attn, state_dtype
from lasp.kernels.documents import Documents, as_documents
from lasp.kernels.linear_attn import check_linear_attn_args
from lasp.kernels.linear_attn.gated import as_vector_form
from lasp.kernels.linear_attn.op import (
    check_beta,
    check_documents,
    check_gate,
    check_initial_state,
    gate_form,
    gate_with_resets,
)
from lasp.kernels.softmax_attn import check_softmax_attn_args, softmax_attn
from lasp.sp.layout import SeqLayout, shard_sequence


def check_heads_divisible(H: int, W: int) -> None:
    """Ulysses gives each rank H / W whole heads."""
    if H % W:
        raise ValueError(f"Ulysses splits heads across the group: {H} heads are not divisible by {W} ranks")


def decay_digest(log_decay: Tensor) -> float | Tensor:
    """A summary of the decay values: a weighted sum whose weights differ per head, so a permutation or a
    changed value changes it. On a GPU a 0-dim float64 tensor computed there (no host sync: it is read with
    the rest of the header, after the collective); on the CPU a float, at once."""
    if log_decay.device.type == "cpu":
        return math.fsum(x * math.sqrt(i + 1) for i, x in enumerate(log_decay.detach().double().tolist()))
    g = log_decay.detach().to(torch.float64).flatten()
    w = torch.arange(1, g.numel() + 1, dtype=torch.float64, device=g.device).sqrt_()
    return (g * w).sum()


def fingerprint(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: str,
    causal: bool,
    scale: float,
    log_decay: Tensor | None,
    linear: bool,
    gate: Tensor | None = None,
    docs: Documents | None = None,
    delta: bool = False,
    states: tuple[bool, bool] = (False, False),
) -> Fingerprint:
    """What every rank of an SP op must pass alike (see the module doc); `docs`: the global documents."""
    B, T, H, K = q.shape
    fields = [
        ("local length", T),
        ("batch size", B),
        ("query heads", H),
        ("key/value heads", k.shape[2]),
        ("key head dim", K),
        ("value head dim", v.shape[3]),
        ("dtype", str(q.dtype).removeprefix("torch.")),
        ("layout", layout),
        ("causal", bool(causal)),
        ("scale", scale),
    ]
    if linear:
        fields.append(("decay", None if log_decay is None else decay_digest(log_decay)))
        fields.append(("gate", None if gate is None else gate_form(gate)))
        fields.append(("delta rule", delta))
        fields.append(("initial state", states[0]))
        fields.append(("final state", states[1]))
    fields.append(("documents", None if docs is None else docs.digest()))
    return Fingerprint(op, tuple(fields))


def _checked_locally(op: str, group, device: torch.device, check_ranks: bool, checks: Callable):
    """Run the local checks; on failure tell the other ranks first (see module doc), then raise."""
    try:
        return checks()
    except (ValueError, TypeError):
        if check_ranks:
            refuse(Fingerprint(op), group, device)
        raise


def _carried(fp: Fingerprint | None, in_band: bool, group, device: torch.device) -> Fingerprint | None:
    """The fingerprint the op's own all-gather carries (`in_band`), or None once it was exchanged here."""
    if fp is not None and not in_band:
        agree(fp, group, device)
        return None
    return fp


def _device(q) -> torch.device:
    return q.device if isinstance(q, Tensor) else torch.device("cpu")


@dataclass(frozen=True)
class LinearForm:
    """A linear-attention call's form once checked, as every SP implementation takes it."""

    log_decay: Tensor | None = None
    gate: Tensor | None = None
    """[B, T, H, Kg] (Kg = 1 a scalar gate, K a vector gate), document starts as -inf; None: no gate."""
    beta: Tensor | None = None
    """[B, T, H]: the delta rule; None: not."""
    causal: bool = True
    docs: Documents | None = None
    """The global documents, only for an implementation that masks them itself (Ring); else in the gate."""
    initial_state: Tensor | None = None
    want_final: bool = False


SUPPORTS = frozenset({"gate", "beta", "states"})
"""What the core methods take (lasp.sp.core); "own_documents" marks an op that masks documents itself."""


def run_sp_linear_attn(
    impl: Callable[..., Tensor | tuple[Tensor, Tensor]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    op: str,
    group,
    layout: str,
    log_decay: Tensor | None,
    causal: bool,
    scale: float | None,
    kernel: LinearAttnKernel | None,
    check_ranks: bool,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    cu_seqlens=None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    in_band: bool = False,
    heads_divisible: bool = False,
    supports: frozenset = SUPPORTS,
    why_not: dict[str, str] | None = None,
):
    """Check every argument before any communication, then run impl(q, k, v, form: LinearForm, scale,
    group, lay, kernel, fingerprint) (k, v repeated to q's heads), or `linear_attn` on a group of one.
    `in_band`: `impl` carries the fingerprint in its own first collective; else it is exchanged here first.
    `heads_divisible`: the query heads must split evenly across the group (Ulysses). `supports` names what
    `impl` takes beyond the plain form: "gate", "beta" (the delta rule), "states" (initial and final), and
    "own_documents" (it masks `cu_seqlens` itself; else they become a gate with -inf at the starts, which
    needs "gate"); what it lacks is refused by name, with `why_not[name]` (the reason) added."""
    W = group_size(group)
    kernel = DEFAULT_KERNEL if kernel is None else kernel

    def lacks(what: str, arg: str) -> str:
        return f"{op} has no {what} ({arg}){(why_not or {}).get(arg, '')}"

    def checks():
        problems = []
        if gate is not None and "gate" not in supports:
            problems.append(lacks("gated form", "gate"))
        if beta is not None and "beta" not in supports:
            problems.append(lacks("delta rule", "beta"))
        if (initial_state is not None or output_final_state) and "states" not in supports:
            problems.append(lacks("initial or final state", "initial_state, output_final_state"))
        if problems:
            raise ValueError("; ".join(problems) + ": use lasp2, lasp1, allscan or logscan")
        k2, v2, s = check_linear_attn_args(q, k, v, log_decay, causal, scale)
        if gate is not None:
            check_gate(gate, q, log_decay, causal, kernel)
        if beta is not None:
            check_beta(beta, q, log_decay, causal, kernel)
        if initial_state is not None:
            check_initial_state(initial_state, q, v)
        docs = None
        if cu_seqlens is not None:
            docs = check_documents(cu_seqlens, q, q.shape[1] * W, causal, kernel)
        lay = SeqLayout(layout, W)
        lay.check_local_length(q.shape[1])
        if heads_divisible:
            check_heads_divisible(q.shape[2], W)
        return k2, v2, s, lay, docs

    if W == 1:
        k2, v2, s, _, docs = checks()
        return linear_attn(
            q,
            k,
            v,
            log_decay=log_decay,
            gate=gate,
            beta=beta,
            causal=causal,
            scale=s,
            kernel=kernel,
            cu_seqlens=docs,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    k2, v2, s, lay, docs = _checked_locally(op, group, _device(q), check_ranks, checks)
    fp = None
    if check_ranks:
        fp = fingerprint(
            op,
            q,
            k,
            v,
            layout,
            causal,
            s,
            log_decay,
            linear=True,
            gate=gate,
            docs=docs,
            delta=beta is not None,
            states=(initial_state is not None, output_final_state),
        )
    fp = _carried(fp, in_band, group, q.device)
    own = None
    if docs is not None and docs.has_resets:
        if "own_documents" in supports and gate is None and beta is None:
            own = docs
        else:
            resets = shard_sequence(docs.resets(q.device), rank=group_rank(group), world_size=W, layout=layout)
            gate = gate_with_resets(gate, log_decay, resets, q.shape[2], state_dtype(q.dtype))
    form = LinearForm(
        log_decay=None if gate is not None else log_decay,
        gate=None if gate is None else as_vector_form(gate),
        beta=beta,
        causal=causal,
        docs=own,
        initial_state=initial_state,
        want_final=output_final_state,
    )
    return impl(q, k2, v2, form, s, group, lay, kernel, fp)


def run_sp_softmax_attn(
    impl: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    op: str,
    group,
    layout: str,
    causal: bool,
    scale: float | None,
    check_ranks: bool,
    in_band: bool = False,
    heads_divisible: bool = False,
    cu_seqlens=None,
) -> Tensor:
    """Check every argument, then run impl(q, k, v, lay, group, causal, scale, fingerprint, docs), or
    `softmax_attn` on a group of one. `in_band` and `heads_divisible` as in `run_sp_linear_attn`.
    `cu_seqlens`: the GLOBAL documents, alike on every rank; `docs` is their `Documents`, or None when no
    row holds more than one document (the op then runs exactly as without)."""
    W = group_size(group)

    def checks():
        s = check_softmax_attn_args(q, k, v, causal, scale)
        docs = None if cu_seqlens is None else as_documents(cu_seqlens, q.shape[0], q.shape[1] * W)
        lay = SeqLayout(layout, W)
        lay.check_local_length(q.shape[1])
        if heads_divisible:
            check_heads_divisible(q.shape[2], W)
        return s, lay, docs

    if W == 1:
        s, _, docs = checks()
        return softmax_attn(q, k, v, causal=causal, scale=s, cu_seqlens=docs)
    s, lay, docs = _checked_locally(op, group, _device(q), check_ranks, checks)
    fp = fingerprint(op, q, k, v, layout, causal, s, None, linear=False, docs=docs) if check_ranks else None
    fp = _carried(fp, in_band, group, q.device)
    return impl(q, k, v, lay, group, causal, s, fp, docs if docs is not None and docs.has_resets else None)
