"""`--dry-run`: the resolved config, the mesh, the parameters, FLOPs per token and memory per rank."""

import torch

from lasp.model.config import DELTA_VARIANTS
from lasp.model.decode import decode_memory
from lasp.parallel.mesh import describe
from lasp.train.config import TrainConfig, dump
from lasp.train.flops import flops_per_token, hardware_flops_per_token, memory_estimate, param_counts


def _num(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def report(cfg: TrainConfig) -> str:
    """The text --dry-run prints."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    counts = param_counts(m)
    fpt = flops_per_token(m, d.seq_len)
    mem = memory_estimate(m, p, d.seq_len, d.global_batch, cfg.train.dtype, cfg.train.checkpoint_every)
    experts = counts["experts"]
    per_rank = ((counts["total"] - counts["embedding"] - experts) / p.tp + experts / (p.ep * p.etp)) / p.pp \
        + counts["embedding"] / p.tp
    dec = decode_memory(m, getattr(torch, cfg.train.dtype))
    local_tokens = d.seq_len // p.sp * (d.global_batch // p.dp // p.microbatches)
    lines = [
        "# resolved config",
        dump(cfg).rstrip(),
        "",
        "# mesh",
        describe(p, d.seq_len, m.num_layers, m.num_heads, d.global_batch),
        "",
        "# model",
        f"layers {m.num_layers} ({m.layer_pattern} repeated: "
        f"{sum(m.mixer(i) == 'L' for i in range(m.num_layers))} linear, "
        f"{sum(m.mixer(i) == 'S' for i in range(m.num_layers))} softmax), hidden {m.hidden_size}, "
        f"heads {m.num_heads} (kv {m.num_kv_heads}), head dim {m.head_dim}, vocab {m.vocab_size}",
        f"parameters: {_num(counts['total'])} total, {_num(counts['total'] - counts['embedding'])} without the "
        f"embedding, {_num(counts['matmul'])} in matmuls (LM head included); about {_num(per_rank)} per rank",
        *([f"mixture of experts: {_num(counts['active'])} active parameters per token of {_num(counts['total'])} "
           f"({m.moe.top_k} of {m.moe.num_experts} experts of width {m.moe.ffn_hidden_size}"
           f"{f', a shared one of {m.moe.shared_ffn_hidden_size}' if m.moe.shared_ffn_hidden_size else ''}, "
           f"pattern {m.moe.pattern}); {_num(experts)} in routed experts, split over ep = {p.ep} ranks "
           f"(etp = {p.etp})"] if m.moe else []),
        f"model FLOPs per token (forward + backward): {_num(fpt)}; per step: {_num(fpt * cfg.tokens_per_step)} "
        f"({_num(cfg.tokens_per_step)} tokens); MFU counts these",
        f"hardware FLOPs per token of the chunked kernels (64-token blocks): "
        f"{_num(hardware_flops_per_token(m, d.seq_len))}",
        f"decoding state per sequence: {_num(dec.fixed_bytes)}B fixed (linear layers' states"
        f"{' and short-convolution inputs' if m.linear_variant in DELTA_VARIANTS else ''}) + "
        f"{_num(dec.per_token_bytes)}B per token (softmax layers' KV cache), {cfg.train.dtype}",
        f"tokens per rank per microbatch: {local_tokens} ({d.global_batch // p.dp // p.microbatches} rows x "
        f"{d.seq_len // p.sp} tokens)",
        "",
        f"# memory per rank (estimate, {cfg.train.dtype}, activation checkpointing "
        f"{cfg.train.activation_checkpointing}, busiest pipeline stage)",
        "  ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()),
    ]
    return "\n".join(lines)
