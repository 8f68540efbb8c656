"""The entry points: `sp_linear_attn` and `sp_softmax_attn`, a method by name, and the named ops as aliases.

Linear methods (docs/communication.md has their costs):
    lasp2, lasp1, allscan, logscan   the one affine-map core (lasp.sp.core) with its four combiners;
    ulysses                          heads split by all-to-all (H % W == 0);
    ring                             keys and values around the ring (no gate, no delta rule);
    auto                             the cost model's pick for the call (lasp.sp.cost).
Softmax methods: lasp2h, ulysses, ring, auto.
"""

from torch import Tensor

from lasp.distributed import group_size
from lasp.kernels import LinearAttnKernel
from lasp.kernels.linear_attn.product import run_product
from lasp.sp.chain import ALLSCAN_BLOCKS, Chain
from lasp.sp.core import Job, sp_core
from lasp.sp.dispatch import LinearForm, run_sp_linear_attn
from lasp.sp.lasp2 import AllGather
from lasp.sp.logscan import LogScan

CORE_METHODS = {
    "lasp2": lambda group, lay, fp: AllGather(group, lay, fp),
    "lasp1": lambda group, lay, fp: Chain(group, lay, blocks=1, name="lasp1"),
    "allscan": lambda group, lay, fp: Chain(group, lay, blocks=ALLSCAN_BLOCKS, name="allscan"),
    "logscan": lambda group, lay, fp: LogScan(group, lay),
}
LINEAR_METHODS = (*CORE_METHODS, "ulysses", "ring", "auto")
SOFTMAX_METHODS = ("lasp2h", "ulysses", "ring", "auto")


def _core_impl(method: str):
    def impl(q, k, v, form: LinearForm, scale, group, lay, kernel, fp):
        job = Job(
            CORE_METHODS[method](group, lay, fp),
            lay,
            group,
            kernel,
            scale,
            form.causal,
            form.log_decay,
            form.want_final,
        )
        o, final = sp_core(q, k, v, job, gate=form.gate, beta=form.beta, initial_state=form.initial_state)
        return (o, final) if form.want_final else o

    return impl


def sp_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "lasp2",
    group=None,
    layout: str = "zigzag",
    log_decay: Tensor | None = None,
    gate: Tensor | None = None,
    beta: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens=None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel: LinearAttnKernel | None = None,
    check_ranks: bool = True,
    householder: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequence-parallel linear attention of any form over `group` (None = the default group) by `method`.

    Each rank passes its local shard (see `shard_sequence`): q, k [B, T, H, K] (k, v may have fewer heads,
    GQA), v [B, T, Hkv, V], split by `layout` ("contiguous" or "zigzag"); returns this rank's shard of
    `linear_attn` on the whole sequence, and the gradients of every input are the shards of the full ones.
    The forms are `linear_attn`'s: `log_decay` [H] (constant decay), `gate` (this rank's shard, [B, T, H] or
    [B, T, H, K]), `beta` [B, T, H] (the delta rule: DeltaNet, with a gate Gated DeltaNet or KDA);
    `cu_seqlens` the GLOBAL packed documents (alike on every rank); bidirectional (causal=False) without
    decay. `initial_state` [B, H, K, V], the state before the whole sequence (alike on every rank); its
    gradient is partial per rank (sum it over the group). `output_final_state`: also return the state after
    the whole sequence, on every rank (one broadcast more; its gradient is summed over the ranks).
    `check_ranks`: ranks that pass different arguments all raise `RanksDisagree` naming the values (lasp2
    carries the check in its own all-gather; the others exchange it first in one small all-gather).
    `householder` n (DeltaProduct): this rank's k, v, beta with n rows per token, as `linear_attn` takes them;
    it runs as the delta rule on the interleaved sequence, so every method serves it.
    With no process group, or a group of one rank, this is `linear_attn`.
    """
    if method not in LINEAR_METHODS:
        raise ValueError(f"method must be one of {', '.join(LINEAR_METHODS)}, got {method!r}")
    if householder is not None:  # k, v, beta hold n rows per token: the delta rule on the interleaved rows
        return run_product(
            sp_linear_attn,
            q,
            k,
            v,
            householder,
            length=q.shape[1] * group_size(group),
            method=method,
            group=group,
            layout=layout,
            log_decay=log_decay,
            gate=gate,
            beta=beta,
            causal=causal,
            scale=scale,
            cu_seqlens=cu_seqlens,
            initial_state=initial_state,
            output_final_state=output_final_state,
            kernel=kernel,
            check_ranks=check_ranks,
        )
    if method == "auto":
        from lasp.sp.cost import choose_linear

        method = choose_linear(
            q,
            k,
            v,
            group=group,
            layout=layout,
            log_decay=log_decay,
            gate=gate,
            beta=beta,
            causal=causal,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    if method in ("ulysses", "ring") and (initial_state is not None or output_final_state):
        raise ValueError(
            f"{method} has no initial or final state (initial_state, output_final_state): use lasp2, "
            "lasp1, allscan or logscan"
        )
    if method == "ulysses":
        from lasp.sp.ulysses import ulysses_linear_attn

        return ulysses_linear_attn(
            q,
            k,
            v,
            group=group,
            layout=layout,
            log_decay=log_decay,
            gate=gate,
            beta=beta,
            causal=causal,
            scale=scale,
            check_ranks=check_ranks,
            cu_seqlens=cu_seqlens,
        )
    if method == "ring":
        from lasp.sp.ring_linear import ring_linear_attn

        return ring_linear_attn(
            q,
            k,
            v,
            group=group,
            layout=layout,
            log_decay=log_decay,
            causal=causal,
            scale=scale,
            check_ranks=check_ranks,
            cu_seqlens=cu_seqlens,
            beta=beta,
            **({} if gate is None else {"gate": gate}),
        )
    return run_sp_linear_attn(
        _core_impl(method),
        q,
        k,
        v,
        op=method,
        group=group,
        layout=layout,
        log_decay=log_decay,
        causal=causal,
        scale=scale,
        kernel=kernel,
        check_ranks=check_ranks,
        gate=gate,
        beta=beta,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        output_final_state=output_final_state,
        in_band=CORE_METHODS[method] is CORE_METHODS["lasp2"],
    )


def sp_softmax_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "lasp2h",
    group=None,
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens=None,
    check_ranks: bool = True,
) -> Tensor:
    """Sequence-parallel softmax attention over `group` by `method` ("lasp2h", "ulysses", "ring" or "auto");
    the contract of `lasp2h_softmax_attn`."""
    if method not in SOFTMAX_METHODS:
        raise ValueError(f"method must be one of {', '.join(SOFTMAX_METHODS)}, got {method!r}")
    if method == "auto":
        from lasp.sp.cost import choose_softmax

        method = choose_softmax(q, k, v, group=group, layout=layout, causal=causal)
    from lasp.sp.lasp2h import lasp2h_softmax_attn
    from lasp.sp.ring import ring_softmax_attn
    from lasp.sp.ulysses import ulysses_softmax_attn

    op = {"lasp2h": lasp2h_softmax_attn, "ulysses": ulysses_softmax_attn, "ring": ring_softmax_attn}[method]
    return op(
        q, k, v, group=group, layout=layout, causal=causal, scale=scale, check_ranks=check_ranks, cu_seqlens=cu_seqlens
    )


def _alias(method: str, doc: str):
    def op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        group=None,
        layout: str = "contiguous",
        log_decay=None,
        gate=None,
        beta=None,
        causal: bool = True,
        scale: float | None = None,
        kernel: LinearAttnKernel | None = None,
        check_ranks: bool = True,
        cu_seqlens=None,
        householder: int | None = None,
    ) -> Tensor:
        return sp_linear_attn(
            q,
            k,
            v,
            method=method,
            group=group,
            layout=layout,
            log_decay=log_decay,
            gate=gate,
            beta=beta,
            causal=causal,
            scale=scale,
            kernel=kernel,
            check_ranks=check_ranks,
            cu_seqlens=cu_seqlens,
            householder=householder,
        )

    op.__name__ = op.__qualname__ = f"{method}_linear_attn"
    op.__doc__ = f"`sp_linear_attn(..., method={method!r})` ({doc}); the layout defaults to contiguous."
    return op


lasp2_linear_attn = _alias("lasp2", "one all-gather of the chunks' pairs each way")
lasp1_linear_attn = _alias("lasp1", "the state passed rank to rank")
allscan_linear_attn = _alias("allscan", "the chain pipelined over blocks of V columns")
logscan_linear_attn = _alias("logscan", "a log-depth scan of the pairs by point-to-point messages")
