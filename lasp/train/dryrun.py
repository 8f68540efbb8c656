"""`--dry-run`: the resolved config, the mesh, the parameters, FLOPs per token and memory per rank."""

import torch

from lasp.model.decode import decode_memory
from lasp.model.variants import VARIANTS
from lasp.parallel.mesh import describe
from lasp.train.config import TrainConfig, dump
from lasp.train.flops import flops_per_token, hardware_flops_per_token, memory_estimate, param_counts


def _num(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _auto_lines(cfg: TrainConfig) -> list[str]:
    """What `auto` SP methods pick: on a preset link, the cost model's choice for this config's layers; when
    calibrating, that it is made at the first step."""
    p, m, d = cfg.parallel, cfg.model, cfg.data
    auto = [kind for kind in ("linear", "softmax") if getattr(p.sp_method, kind) == "auto"]
    if p.sp == 1 or not auto:
        return []
    if p.sp_link == "calibrate":
        return [
            f"sp auto ({', '.join(auto)} layers): picked at the first step by the cost model, on the SP group's "
            "link measured then (logged)"
        ]
    from lasp.sp.cost import LINEAR_CANDIDATES, PRESETS, SOFTMAX_CANDIDATES, Shape, pick

    rows = d.global_batch // p.dp // p.microbatches
    itemsize = torch.empty((), dtype=getattr(torch, cfg.train.dtype)).element_size()
    heads, kv = m.num_heads // p.tp, max(1, m.num_kv_heads // p.tp)
    steps, memories = m.kv_copies // m.memory_heads, m.memory_heads  # the core's rows per token, heads per head
    out = []
    for kind in auto:
        shape = Shape(
            p.sp,
            rows,
            d.seq_len // p.sp * (steps if kind == "linear" else 1),
            heads * (memories if kind == "linear" else 1),
            heads * memories if kind == "linear" and memories > 1 else kv,  # MoM's memory heads: no GQA
            m.head_dim,
            m.head_dim,
            p.sp_layout,
            itemsize,
            VARIANTS[m.linear_variant].form if kind == "linear" else "none",
        )
        pool = LINEAR_CANDIDATES if kind == "linear" else SOFTMAX_CANDIDATES
        pool = [c for c in pool if not c.startswith("ulysses") or heads % p.sp == 0]
        best, cost = pick(pool, shape, PRESETS[p.sp_link])
        best = "ulysses" if best == "ulysses_linear" else best
        times = ", ".join(
            f"{c.removesuffix('_linear')} {t * 1e6:.0f} us" for c, t in sorted(cost.items(), key=lambda kv: kv[1])
        )
        out.append(f"sp auto, {kind} layers on {p.sp_link}: {best} (messages per layer, forward + backward: {times})")
    return out


def _linear_core_lines(m) -> list[str]:
    """What the sequence-parallel core sees of a DeltaProduct or MoM layer (docs/lasp2.md)."""
    if m.linear_variant == "deltaproduct":
        n = m.num_householder
        return [
            f"deltaproduct: {n} delta-rule steps per token, so each linear layer's core runs {n} x the tokens "
            f"(state {m.head_dim} x {m.head_dim} per head)"
        ]
    if m.mom_num_memories:
        shared = ", plus a shared one" if m.mom_shared_memory else ""
        return [
            f"mixture of memories: {m.mom_num_memories} memories per head{shared}, each token routed to "
            f"{m.mom_top_k}; each linear layer's core runs {m.num_heads} x {m.memory_heads} memory heads "
            f"({m.memory_heads} x the state)"
        ]
    return []


def report(cfg: TrainConfig) -> str:
    """The text --dry-run prints."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    counts = param_counts(m)
    fpt = flops_per_token(m, d.seq_len)
    mem = memory_estimate(m, p, d.seq_len, d.global_batch, cfg.train.dtype, cfg.train.checkpoint_every)
    experts = counts["experts"]
    per_rank = ((counts["total"] - counts["embedding"] - experts) / p.tp + experts / (p.ep * p.etp)) / p.pp + counts[
        "embedding"
    ] / p.tp
    dec = decode_memory(m, getattr(torch, cfg.train.dtype))
    local_tokens = d.seq_len // p.sp * (d.global_batch // p.dp // p.microbatches)
    lines = [
        "# resolved config",
        dump(cfg).rstrip(),
        "",
        "# mesh",
        describe(p, d.seq_len, m.num_layers, m.num_heads, d.global_batch),
        *_auto_lines(cfg),
        "",
        "# model",
        f"layers {m.num_layers} ({m.layer_pattern} repeated: "
        f"{sum(m.mixer(i) == 'L' for i in range(m.num_layers))} linear, "
        f"{sum(m.mixer(i) == 'S' for i in range(m.num_layers))} softmax), hidden {m.hidden_size}, "
        f"heads {m.num_heads} (kv {m.num_kv_heads}), head dim {m.head_dim}, vocab {m.vocab_size}",
        *_linear_core_lines(m),
        f"parameters: {_num(counts['total'])} total, {_num(counts['total'] - counts['embedding'])} without the "
        f"embedding, {_num(counts['matmul'])} in matmuls (LM head included); about {_num(per_rank)} per rank",
        *(
            [
                f"mixture of experts: {_num(counts['active'])} active parameters per token of {_num(counts['total'])} "
                f"({m.moe.top_k} of {m.moe.num_experts} experts of width {m.moe.ffn_hidden_size}"
                f"{f', a shared one of {m.moe.shared_ffn_hidden_size}' if m.moe.shared_ffn_hidden_size else ''}, "
                f"pattern {m.moe.pattern}); {_num(experts)} in routed experts, split over ep = {p.ep} ranks "
                f"(etp = {p.etp})"
            ]
            if m.moe
            else []
        ),
        f"model FLOPs per token (forward + backward): {_num(fpt)}; per step: {_num(fpt * cfg.tokens_per_step)} "
        f"({_num(cfg.tokens_per_step)} tokens); MFU counts these",
        f"hardware FLOPs per token of the chunked kernels (64-token blocks): "
        f"{_num(hardware_flops_per_token(m, d.seq_len))}",
        f"decoding state per sequence: {_num(dec.fixed_bytes)}B fixed (linear layers' states"
        f"{' and short-convolution inputs' if VARIANTS[m.linear_variant].delta else ''}) + "
        f"{_num(dec.per_token_bytes)}B per token (softmax layers' KV cache), {cfg.train.dtype}",
        f"tokens per rank per microbatch: {local_tokens} ({d.global_batch // p.dp // p.microbatches} rows x "
        f"{d.seq_len // p.sp} tokens)",
        "",
        f"# memory per rank (estimate, {cfg.train.dtype}, activation checkpointing "
        f"{cfg.train.activation_checkpointing}, busiest pipeline stage)",
        "  ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()),
    ]
    return "\n".join(lines)
