"""Model FLOPs per token (for MFU), parameter counts and a memory estimate per rank.

FLOPs per token, forward + backward (docs/design.md, "The trainer"; written out in docs/training.md):

    6 * N_matmul                          every weight matrix a token passes through (q, k, v, o, gate, up,
                                          down of each layer, the log-gate projections of simple_gla / gla
                                          layers, and the LM head; not the embedding lookup; in a MoE layer
                                          the router and the top_k routed experts plus the shared one: the
                                          active parameters)
  + 6 * H * d * N          per S layer    causal softmax attention: q k^T and p v, 2 FLOPs per
                                          multiply-add, x3 for forward + backward, half the N x N scores
  + 12 * H * d_k * d_v     per L layer    linear attention: the state update k v^T and the read-out q^T S,
                                          2 FLOPs each, x3 for forward + backward
  + 6 * H * (5 C d + 3 d^2 + d^3 / C)     the delta rule instead (deltanet, gated_deltanet, kda, deltaproduct
                                          with n steps per token n times, each step a token): its chunk
        + 6 * w * (H + 2 Hkv) d           form on blocks of C = 64 tokens, per token and head q k^T and k k^T
                                          (C d each), the triangular solve for [U0 | W] (C d), P U0 and P W
                                          (C d each), Kt^T W, Kt^T U0 and Qm S0 (d^2 each), and the chain's
                                          share d^3 / C; and the short convolutions (w taps on q, k and v)

N is the sequence length (tokens attended), H query heads, d the head dim. Mixture-of-Memories counts the
memories a token is routed to (top k, plus the shared one) as heads, and their projections only; the masked
form runs every memory, which the hardware FLOPs count. Hardware FLOPs of the chunked kernels
(intra-chunk quadratic blocks, recomputation) are higher; MFU counts only the model's.
"""

from lasp.model.config import ModelConfig
from lasp.model.lora import targets
from lasp.model.variants import VARIANTS, Dims
from lasp.parallel.config import ParallelConfig

BLOCK = 64  # tokens per block of the chunked kernels

# Dense peak FLOP/s per GPU (no sparsity), from the vendors' data sheets: bf16 tensor cores, and plain
# FP32 for float32 (the trainer leaves PyTorch's default of full-precision float32 matmuls, not TF32).
PEAK_FLOPS = {
    "H100 SXM": {"bfloat16": 989e12, "float32": 67e12},  # NVIDIA H100 data sheet
    "H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float32": 60e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},  # same SXM silicon as H100, more HBM
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},  # NVIDIA A100 data sheet
    "L40S": {"bfloat16": 362e12, "float32": 91.6e12},
    "A10G": {"bfloat16": 125e12, "float32": 31.2e12},
}


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """Peak FLOP/s of one device of this name (torch.cuda.get_device_name), or None when unknown (CPU)."""
    if not device_name:
        return None
    name = device_name.upper().replace("NVIDIA ", "")
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        parts = key.upper().split()
        if all(p in name for p in parts):
            return PEAK_FLOPS[key][dtype]
    if "H100" in name:
        return PEAK_FLOPS["H100 SXM"][dtype]
    return None


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Parameters by kind: embedding, matmul weights (LM head included), norms, the other small ones (the
    delta rule's convolutions, A_log, dt_bias; Hedgehog's feature maps), LoRA adapters, and the total."""
    h, d, H = m.hidden_size, m.head_dim, m.num_heads
    attn = h * d * (2 * H + 2 * m.num_kv_heads)
    variant = VARIANTS[m.linear_variant]
    delta = variant.delta
    sizes = _dims(m)
    linear = sum(m.mixer(i) == "L" for i in range(m.num_layers))
    # a linear layer's own projections: the variant's, the keys and values beyond one per head (DeltaProduct's
    # steps, MoM's memories) and MoM's router
    gate = variant.projections(sizes) + 2 * h * m.num_kv_heads * d * (m.kv_copies - 1)
    gate += h * m.mom_num_memories
    mlp, experts, inactive = _mlp_params(m)
    inactive += linear * _idle_memory_params(m, variant, sizes)
    norms = m.num_layers * 2 * h + h + linear * (d if m.output_norm or delta else 0)
    norms += m.num_layers * 2 * d if m.qk_norm else 0  # Qwen3's q/k norms
    small = (H + m.num_kv_heads) * d * d if m.feature_map == "hedgehog" else 0  # its per-head maps
    small += H if m.window else 0  # the window's per-head share
    if delta:
        small += m.conv_size * (H + 2 * m.num_kv_heads * m.kv_copies) * d
    small += variant.extras(sizes)
    biases = m.num_layers * (H + 2 * m.num_kv_heads) * d if m.attention_bias else 0  # Qwen2's q/k/v biases
    dims = {
        "q_proj": (h, H * d),
        "k_proj": (h, m.num_kv_heads * d),
        "v_proj": (h, m.num_kv_heads * d),
        "o_proj": (H * d, h),
        "gate_proj": (h, m.ffn_hidden_size),
        "up_proj": (h, m.ffn_hidden_size),
        "down_proj": (m.ffn_hidden_size, h),
    }
    lora = m.num_layers * m.lora_rank * sum(sum(dims[t]) for t in targets(m)) if m.lora_rank else 0
    embed = m.vocab_size * h
    matmul = m.num_layers * attn + mlp + gate * linear + m.vocab_size * h
    total = embed + matmul + norms + linear * small + biases + lora - (m.vocab_size * h if m.tie_embeddings else 0)
    return {
        "embedding": embed,
        "matmul": matmul,
        "norms": norms,
        "other": linear * small + biases,
        "lora": lora,
        "total": total,
        "experts": experts,
        "active": total - inactive,
        "active_matmul": matmul - inactive,
    }


def _dims(m: ModelConfig) -> Dims:
    """The sizes the variant table's parameter counts take (Liger's key gate has no parameters)."""
    steps = m.kv_copies // m.memory_heads
    return Dims(
        m.hidden_size, m.num_heads, m.head_dim, m.gate_low_rank, m.gate_source == "projection", steps, m.memory_heads
    )


def _idle_memory_params(m: ModelConfig, variant, sizes: Dims) -> int:
    """MoM: the projections of the memories a token is not routed to (their keys, values, beta and gate), per
    layer; the masked form computes them, the model's FLOPs leave them out like a MoE's idle experts."""
    if not m.mom_num_memories:
        return 0
    one = sizes._replace(memories=1)
    per_memory = variant.projections(sizes._replace(memories=2)) - variant.projections(one)
    return (m.mom_num_memories - m.mom_top_k) * (per_memory + 2 * m.hidden_size * m.num_kv_heads * m.head_dim)


def _mlp_params(m: ModelConfig) -> tuple[int, int, int]:
    """(feed-forward matmul parameters of every layer, of which routed experts, of which a token does not
    use: the experts outside its top k). A MoE layer: the router (h x E), E routed SwiGLUs, the shared one."""
    h, moe = m.hidden_size, m.moe
    total = experts = inactive = 0
    for i in range(m.num_layers):
        if moe is None or not moe.is_moe(i):
            total += 3 * h * m.ffn_hidden_size
            continue
        one = 3 * h * moe.ffn_hidden_size
        total += h * moe.num_experts + moe.num_experts * one + 3 * h * moe.shared_ffn_hidden_size
        experts += moe.num_experts * one
        inactive += (moe.num_experts - moe.top_k) * one
    return total, experts, inactive


def active_memories(m: ModelConfig) -> int:
    """MoM: the memory heads a token is routed to per head (top k, and the shared one); 1 without MoM."""
    return m.mom_top_k + int(m.mom_shared_memory) if m.mom_num_memories else 1


def delta_flops_per_token(m: ModelConfig, block: int = BLOCK, memories: int | None = None) -> float:
    """One delta-rule layer's attention FLOPs per token, forward + backward (module doc): DeltaProduct's steps
    each a token of the chunk form, MoM's `memories` (default: the routed ones) each a head."""
    d, H = m.head_dim, m.num_heads
    memories = active_memories(m) if memories is None else memories
    steps = m.kv_copies // m.memory_heads
    chunk = 6.0 * H * steps * memories * (5 * block * d + 3 * d * d + d**3 / block)
    return chunk + 6.0 * m.conv_size * (H + 2 * m.num_kv_heads * m.kv_copies) * d


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token, forward + backward (formula in the module docstring)."""
    d = m.head_dim
    counts = param_counts(m)
    f = 6.0 * (counts["active_matmul"] + counts["lora"])  # MoE: the router, the top k and shared experts
    for i in range(m.num_layers):
        if m.mixer(i) == "S":
            f += 6.0 * m.num_heads * d * seq_len
        elif VARIANTS[m.linear_variant].delta:
            f += delta_flops_per_token(m)
        else:  # Hedgehog's features are 2 d wide; a window adds its scores and values, twice (taken out)
            f += 12.0 * m.num_heads * active_memories(m) * d * d * (2 if m.feature_map == "hedgehog" else 1)
            f += 24.0 * m.num_heads * d * m.window
    return f


def hardware_flops_per_token(m: ModelConfig, seq_len: int, block: int = BLOCK) -> float:
    """What the chunked linear-attention kernels execute per token, forward + backward (reported apart from
    the model FLOPs): each L layer's blocks of `block` tokens also compute the full (masked) q k^T block
    and its product with v, 2 * block * (d_k + d_v) per token and head forward, x3 with the backward. The
    delta rule's model FLOPs are already its chunk form's; its backward recomputes the forward, one third
    more."""
    d, M = m.head_dim, m.memory_heads
    linear_layers = sum(m.mixer(i) == "L" for i in range(m.num_layers))
    idle = 6.0 * _idle_memory_params(m, VARIANTS[m.linear_variant], _dims(m))
    if VARIANTS[m.linear_variant].delta:  # MoM's masked form runs every memory head
        every = delta_flops_per_token(m, block, M)
        extra = every * 4 / 3 - delta_flops_per_token(m, block)
        return flops_per_token(m, seq_len) + linear_layers * (extra + idle)
    linear = 6.0 * m.num_heads * M * block * 2 * d + 12.0 * m.num_heads * (M - active_memories(m)) * d * d
    return flops_per_token(m, seq_len) + linear_layers * (linear + idle)


def memory_estimate(
    m: ModelConfig, p: ParallelConfig, seq_len: int, global_batch: int, dtype: str, checkpoint_every: int
) -> dict[str, float]:
    """Rough bytes per rank on the busiest pipeline stage (the larger of the first and the last): float32
    weights (4 B per parameter), gradients (4 B) and AdamW states (8 B), of which ZeRO-1 shards the AdamW
    states over DP x SP, ZeRO-2 the gradients too and ZeRO-3 everything; activations (Korthikanti et al.
    2022: s b h (10 + 24 / tp) bytes per layer in 16-bit, doubled for float32, plus SwiGLU's wider
    tensors), with up to pp microbatches in flight on the first stage under 1F1B and one on the last; one
    chunk of float32 logits on the last stage. An estimate to plan a layout, typically within +-30%."""
    counts = param_counts(m)
    vh = m.vocab_size * m.hidden_size
    # per layer and TP rank; the routed experts are split over ep (and etp) ranks instead
    layer_params = (
        (counts["matmul"] - vh - counts["experts"]) / p.tp + counts["experts"] / (p.ep * p.etp)
    ) / m.num_layers
    layers = m.num_layers // p.pp
    elt = 2 if dtype == "bfloat16" else 4
    tokens = seq_len // p.sp * (global_batch // p.dp // p.microbatches)
    per_layer = tokens * m.hidden_size * (10 + 24 / p.tp) * elt / 2 + tokens * m.ffn_hidden_size * 3 * elt / p.tp
    saved = -(-layers // checkpoint_every) if checkpoint_every else 0  # layers 0, k, 2k, ... are checkpointed
    acts_one = saved * tokens * m.hidden_size * elt + (layers - saved) * per_layer + (per_layer if saved else 0)
    chunk = min(p.loss_chunk_tokens or tokens, tokens)
    # the chunked loss holds one fp32 chunk of logits and its gradient; the plain one three full copies
    logits = (2 if p.loss_chunk_tokens else 3) * chunk * m.vocab_size / p.tp * 4
    shards = p.dp * p.sp
    per_param = (
        4 / (shards if p.zero_stage >= 3 else 1)
        + 4 / (shards if p.zero_stage >= 2 else 1)
        + 8 / (shards if p.zero_stage >= 1 else 1)
    )

    def stage(first: bool, last: bool) -> dict[str, float]:
        params = layer_params * layers + (vh / p.tp if first else 0)
        params += vh / p.tp if last and not (first and m.tie_embeddings) else 0
        acts = (min(p.pp, p.microbatches) if first else 1) * acts_one
        return {
            "weights": 4 * params / (shards if p.zero_stage >= 3 else 1),
            "grads_and_adam": (per_param - 4 / (shards if p.zero_stage >= 3 else 1)) * params,
            "activations": acts,
            "logits": logits if last else 0.0,
        }

    stages = [stage(True, p.pp == 1)] + ([stage(False, True)] if p.pp > 1 else [])
    busiest = max(stages, key=lambda d: sum(d.values()))
    gib = 2.0**30
    return {**{k: v / gib for k, v in busiest.items()}, "total": sum(busiest.values()) / gib}
