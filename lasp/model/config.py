"""Model configuration: typed dataclasses (the model, its MoE layers), one docstring per field, every problem
reported at once. A leaf of lasp.model: it imports only the variant table."""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

from lasp.model.variants import FEATURE_MAPS, LINEAR_VARIANTS, MOM_BASES, VARIANTS

ROUTERS = ("softmax", "sigmoid")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MoEConfig:
    """model.moe: which feed-forward layers are mixtures of experts, and how they route."""

    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    ffn_hidden_size: int = 64
    """Inner width of each routed expert's SwiGLU."""
    shared_ffn_hidden_size: int = 0
    """Inner width of a shared expert that every token goes through (DeepSeek, Qwen-MoE); 0: none."""
    pattern: str = "M"
    """Feed-forward kind of each layer, repeated cyclically like model.layer_pattern: M = mixture of
    experts, D = the dense MLP (e.g. "DM": every other layer, from the second)."""
    router: str = "softmax"
    """softmax (Mixtral: the top k logits, softmax over them; with top_k 1, Switch: the softmax over all
    experts, the top one's probability) or sigmoid (DeepSeek-V3: sigmoid scores,
    normalised over the top k)."""
    expert_bias: bool = False
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the choice
    only, moved after every step by bias_update_rate against the load. Needs router sigmoid."""
    bias_update_rate: float = 1e-3
    """Step of the expert bias: b_i += rate * sign(mean load - load_i) per training step."""
    aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss (per MoE layer); 0: none."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss (per MoE layer); 0: none."""
    capacity_factor: float | None = None
    """None: dropless (every token reaches its k experts). A number: each expert takes at most
    ceil(tokens x top_k / num_experts x factor) tokens of a forward, on each rank; the rest are dropped."""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("invalid MoE config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        bad = type_problems(self, "model.moe")
        p = list(bad.values())
        for name in ("num_experts", "top_k", "ffn_hidden_size"):
            if name not in bad and getattr(self, name) < 1:
                p.append(f"model.moe.{name} must be >= 1, got {getattr(self, name)}")
        if not {"num_experts", "top_k"} & set(bad) and self.top_k > self.num_experts:
            p.append(f"model.moe.top_k ({self.top_k}) must be at most model.moe.num_experts ({self.num_experts})")
        if "shared_ffn_hidden_size" not in bad and self.shared_ffn_hidden_size < 0:
            p.append(
                f"model.moe.shared_ffn_hidden_size must be >= 0 (0: no shared expert), got "
                f"{self.shared_ffn_hidden_size}"
            )
        if "pattern" not in bad and (not self.pattern or not set(self.pattern) <= {"M", "D"}):
            p.append(f"model.moe.pattern must be a non-empty string of M (MoE) and D (dense), got {self.pattern!r}")
        router_ok = "router" not in bad and self.router in ROUTERS
        if "router" not in bad and not router_ok:
            p.append(f"model.moe.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if router_ok and "expert_bias" not in bad and self.expert_bias and self.router != "sigmoid":
            p.append(
                "model.moe.expert_bias (auxiliary-loss-free balancing) needs model.moe.router sigmoid, got "
                f"{self.router}"
            )
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            if name not in bad and not getattr(self, name) >= 0:
                p.append(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        if "capacity_factor" not in bad and self.capacity_factor is not None and not self.capacity_factor > 0:
            p.append(f"model.moe.capacity_factor must be > 0 or null (dropless), got {self.capacity_factor}")
        return p

    def is_moe(self, layer: int) -> bool:
        return self.pattern[layer % len(self.pattern)] == "M"


@dataclass
class ModelConfig:
    """Shape of a Linear-Llama: Llama-3 blocks whose token mixers follow `layer_pattern`."""

    vocab_size: int = 256
    """Tokens in the vocabulary."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Query heads of every mixer; head_dim = hidden_size / num_heads."""
    num_kv_heads: int = 2
    """Key/value heads (GQA when fewer than num_heads); used by both mixer kinds."""
    ffn_hidden_size: int = 176
    """Inner width of the SwiGLU MLP."""
    layer_pattern: str = "LLLS"
    """Mixer of each layer, repeated cyclically: L = linear attention, S = softmax attention."""
    linear_variant: str = "lightning"
    """Decay of linear attention: basic (none), lightning (per-head slopes, TNL), retention (RetNet), or a
    data-dependent gate: simple_gla (a scalar per token and head, as simple GLA / Mamba-2), gla (a vector
    over the key dim from a low-rank projection, as GLA), or the delta rule (flash-linear-attention's layers
    of the same names: a short convolution, L2-normalised q and k, beta, an output gate): deltanet (no
    gate), gated_deltanet (a scalar gate per token and head), kda (a vector gate over the key dim), and
    deltaproduct (Gated DeltaProduct: num_householder delta-rule steps per token, one scalar gate)."""
    num_householder: int = 2
    """deltaproduct: delta-rule steps per token (DeltaProduct's Householder factors n_h), each with its own
    key, value and beta (n_h times the key, value and beta projections)."""
    mom_num_memories: int = 0
    """Mixture-of-Memories (MoM) over a gla or gated_deltanet layer: memories per head, each a state of its
    own written only by the tokens the router sends to it (n times the key, value, beta and gate
    projections, n times the state). 0: off."""
    mom_top_k: int = 2
    """MoM: memories each token is routed to (its output mixes their read-outs by the router's weights,
    renormalised over them: at least 2, or the router gets no gradient)."""
    mom_shared_memory: bool = False
    """MoM: one more memory per head that every token writes and reads at weight 1."""
    allow_neg_eigval: bool = False
    """Delta rule: beta = 2 sigmoid(...) in (0, 2) instead of sigmoid(...) in (0, 1) (negative eigenvalues)."""
    conv_size: int = 4
    """Delta rule: taps of the short causal depthwise convolution on q, k and v (SiLU after it)."""
    gate_low_rank: int = 16
    """gla and kda: rank of the gate's projection (hidden -> rank -> heads x head dim)."""
    gate_normalizer: float = 16.0
    """simple_gla and gla: log-gate = logsigmoid(projection) / gate_normalizer (GLA's gate_logit_normalizer)."""
    feature_map: str = "identity"
    """Map applied to q and k before linear attention: identity, elu1, relu, silu, or hedgehog (LoLCATs:
    [softmax(x W), softmax(-x W)] per head, W learned and starting at the identity; the key dim doubles)."""
    gate_source: str = "projection"
    """simple_gla and gla: where the gate comes from: projection (its own, new parameters) or key (Liger:
    the layer's key projection, pooled over the head dim for simple_gla; no new parameters)."""
    linear_rope: bool = False
    """Linear layers apply the softmax layers' RoPE (after q/k norm) to q and k before their feature map,
    as LoLCATs does to a linearised layer."""
    window: int = 0
    """Linear layers (constant decay, no decay or a scalar gate, with a non-negative feature map) also attend
    exactly to the last `window` tokens, the current one included: softmax scores over the RoPE'd q and k
    for those, the linear branch for older ones, under one normaliser with a learned per-head share of each
    (LoLCATs' sliding window, lasp.model.window). 0: off.
    Under sequence parallelism each rank receives the window - 1 rows before its chunks (a halo)."""
    output_norm: bool = True
    """RMS-normalise the linear-attention output per head before the output projection (the delta rule's
    layers have their gated norm regardless): the normaliser of a linear branch that has none. With a window,
    whose normaliser puts the output on softmax's scale, an import that turns softmax layers linear
    (from_hf, train.init_from) refuses it: the fresh norm would rescale the imported layer's output to RMS 1
    (lasp.model.hf.fresh_norm_problems); from_hf then defaults it to false."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    rope_theta: float = 10000.0
    """RoPE base of the softmax layers (positions are global token positions)."""
    rope_scaling: str = "none"
    """RoPE frequency scaling: none, or llama3 (Llama 3.1's: rope_factor, rope_low_freq_factor,
    rope_high_freq_factor over rope_original_max_positions)."""
    rope_factor: float = 8.0
    """llama3 RoPE scaling: how much longer the context is than rope_original_max_positions."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE scaling: wavelengths above rope_original_max_positions / this are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE scaling: wavelengths below rope_original_max_positions / this are kept."""
    rope_original_max_positions: int = 8192
    """llama3 RoPE scaling: the context the model was first trained at."""
    attention_head_dim: int = 0
    """Head dim of every mixer; 0: hidden_size / num_heads (Qwen3's are larger)."""
    attention_bias: bool = False
    """Biases on the q, k and v projections (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE in the softmax layers (Qwen3)."""
    float32_norm_rope: bool = False
    """RMSNorm and RoPE in float32 whatever the model's dtype, as transformers computes them (an imported
    model then gives transformers' logits to the last bits); false: in the model's dtype (float64 stays
    float64 throughout)."""
    lora_rank: int = 0
    """LoRA adapters of this rank on the projections of lora_targets (lasp.model.lora); 0: none. An adapted
    model starts equal to its base (B = 0); lasp.export merges the adapters into the weights."""
    lora_alpha: float = 16.0
    """LoRA's alpha: the adapter's output is scaled by lora_alpha / lora_rank."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """The projections that get adapters, comma-separated, among q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj (every layer's)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""
    moe: MoEConfig | None = None
    """Mixture-of-experts feed-forward layers (MoEConfig above: experts, top-k, router, which
    layers); null: every layer has the dense SwiGLU MLP."""

    def __post_init__(self):
        if isinstance(self.moe, dict):  # a config read back from JSON (checkpoints, exports)
            self.moe = MoEConfig(**self.moe)
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        bad = type_problems(self, "model")
        p = list(bad.values())
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size")
        for name in sizes:
            if name not in bad and getattr(self, name) < 1:
                p.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        ok = {name for name in sizes if name not in bad and getattr(self, name) >= 1}
        if {"hidden_size", "num_heads"} <= ok and self.hidden_size % self.num_heads and not self.attention_head_dim:
            p.append(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        if {"num_heads", "num_kv_heads"} <= ok and self.num_heads % self.num_kv_heads:
            p.append(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )
        pattern_ok = "layer_pattern" not in bad and bool(self.layer_pattern) and set(self.layer_pattern) <= {"L", "S"}
        if "layer_pattern" not in bad and not pattern_ok:
            p.append(f"model.layer_pattern must be a non-empty string of L and S, got {self.layer_pattern!r}")
        if "linear_variant" not in bad and self.linear_variant not in LINEAR_VARIANTS:
            p.append(f"model.linear_variant must be one of {', '.join(LINEAR_VARIANTS)}, got {self.linear_variant!r}")
        if "feature_map" not in bad and self.feature_map not in FEATURE_MAPS:
            p.append(f"model.feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")
        p += self._linearise_problems(bad)
        p += self._lora_problems(bad)
        if self.moe is not None and "lora_targets" not in bad and "lora_rank" not in bad and self.lora_rank:
            on_mlp = [t for t in self.lora_targets.split(",") if t.strip() in ("gate_proj", "up_proj", "down_proj")]
            if on_mlp:
                p.append(
                    f"model.lora_targets {', '.join(on_mlp)}: LoRA on the feed-forward layers is not "
                    "supported with model.moe (the experts); adapt the attention projections"
                )
        p += self._memory_problems(bad)
        if "conv_size" not in bad and self.conv_size < 1:
            p.append(f"model.conv_size must be >= 1, got {self.conv_size}")
        if "gate_low_rank" not in bad and self.gate_low_rank < 1:
            p.append(f"model.gate_low_rank must be >= 1, got {self.gate_low_rank}")
        for name in ("rope_theta", "norm_eps", "gate_normalizer"):
            if name not in bad and not getattr(self, name) > 0:
                p.append(f"model.{name} must be > 0, got {getattr(self, name)}")
        if "rope_scaling" not in bad and self.rope_scaling not in ("none", "llama3"):
            p.append(f"model.rope_scaling must be none or llama3, got {self.rope_scaling!r}")
        if self.rope_scaling == "llama3":
            for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions"):
                if name not in bad and not getattr(self, name) > 0:
                    p.append(f"model.{name} must be > 0, got {getattr(self, name)}")
            if (
                not {"rope_low_freq_factor", "rope_high_freq_factor"} & set(bad)
                and self.rope_high_freq_factor <= self.rope_low_freq_factor
            ):
                p.append(
                    f"model.rope_high_freq_factor ({self.rope_high_freq_factor}) must be above "
                    f"model.rope_low_freq_factor ({self.rope_low_freq_factor})"
                )
        if "attention_head_dim" not in bad and self.attention_head_dim < 0:
            p.append(
                f"model.attention_head_dim must be >= 0 (0: hidden_size / num_heads), got {self.attention_head_dim}"
            )
        if "init_std" not in bad and not self.init_std >= 0:
            p.append(f"model.init_std must be >= 0, got {self.init_std}")
        # RoPE rotates pairs of channels: the softmax layers use it, and linear ones with linear_rope or a window
        rotates = pattern_ok and (
            "S" in self.layer_pattern or self.linear_rope is True or (isinstance(self.window, int) and self.window > 0)
        )
        if (
            rotates
            and {"hidden_size", "num_heads"} <= ok
            and (self.attention_head_dim or self.hidden_size % self.num_heads == 0)
            and self.head_dim % 2
        ):
            p.append(
                f"head dim {self.head_dim} must be even for RoPE (model.hidden_size {self.hidden_size} / "
                f"model.num_heads {self.num_heads}; RoPE is used by softmax layers (model.layer_pattern "
                f"{self.layer_pattern!r}), model.linear_rope and model.window)"
            )
        return p

    def _memory_problems(self, bad: dict) -> list[str]:
        """DeltaProduct's steps per token and MoM's memories."""
        p = []
        if "num_householder" not in bad and self.num_householder < 1:
            p.append(f"model.num_householder must be >= 1, got {self.num_householder}")
        if {"mom_num_memories", "mom_top_k", "linear_variant"} & set(bad) or self.mom_num_memories == 0:
            return p
        if self.mom_num_memories < 0:
            return p + [f"model.mom_num_memories must be >= 0 (0: no MoM), got {self.mom_num_memories}"]
        if not 2 <= self.mom_top_k <= self.mom_num_memories:
            p.append(
                f"model.mom_top_k must be in [2, model.mom_num_memories = {self.mom_num_memories}], got "
                f"{self.mom_top_k}"
                + (
                    " (one memory's weight is renormalised to 1, so the router would get no gradient)"
                    if self.mom_top_k == 1
                    else ""
                )
            )
        if self.linear_variant not in MOM_BASES:
            p.append(
                f"model.mom_num_memories ({self.mom_num_memories}) needs model.linear_variant "
                f"{' or '.join(MOM_BASES)} (a gate that a token not routed to a memory can leave at 1), got "
                f"{self.linear_variant}"
            )
        if self.gate_source != "projection":
            p.append(f"model.mom_num_memories needs model.gate_source projection, got {self.gate_source!r}")
        if isinstance(self.window, int) and self.window:
            p.append(f"model.mom_num_memories cannot be combined with model.window ({self.window})")
        return p

    def _lora_problems(self, bad: dict) -> list[str]:
        p = []
        if "lora_rank" not in bad and self.lora_rank < 0:
            p.append(f"model.lora_rank must be >= 0 (0: no adapters), got {self.lora_rank}")
        if "lora_alpha" not in bad and not self.lora_alpha > 0:
            p.append(f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        if "lora_targets" not in bad:
            names = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
            unknown = [t for t in names if t not in LORA_TARGETS]
            if unknown or (not names and "lora_rank" not in bad and self.lora_rank > 0):
                p.append(
                    f"model.lora_targets must name projections among {', '.join(LORA_TARGETS)}, got "
                    f"{self.lora_targets!r}"
                )
        return p

    def _linearise_problems(self, bad: dict) -> list[str]:
        """The feature map, gate source and window of linearised layers (LoLCATs, Liger)."""
        p = []
        if "gate_source" not in bad and self.gate_source not in ("projection", "key"):
            p.append(f"model.gate_source must be projection or key, got {self.gate_source!r}")
        if {"feature_map", "linear_variant"} & set(bad) or self.linear_variant not in VARIANTS:
            return p  # reported above
        variant = VARIANTS[self.linear_variant]
        if self.feature_map not in variant.feature_maps:
            p.append(
                f"model.feature_map {self.feature_map} doubles the key dim, which model.linear_variant "
                f"{self.linear_variant} (a gate or delta rule over the key dim) does not take; it takes "
                f"{', '.join(variant.feature_maps)}"
            )
        if self.qk_norm is True and variant.delta and "L" in str(self.layer_pattern):
            p.append(
                f"model.qk_norm (per-head q/k RMSNorm) is not applied by the delta-rule layers of "
                f"model.linear_variant {self.linear_variant}, which L2-normalise q and k themselves"
            )
        if "window" in bad:
            return p
        if self.window < 0:
            p.append(f"model.window must be >= 0 (0: no window), got {self.window}")
        elif self.window:
            if not variant.window:
                windowed = [name for name, v in VARIANTS.items() if v.window]
                p.append(
                    f"model.window ({self.window}) needs model.linear_variant {', '.join(windowed)} "
                    f"(a state older tokens can be taken out of), got {self.linear_variant}"
                )
            if self.feature_map not in ("hedgehog", "elu1", "relu"):
                p.append(
                    f"model.window ({self.window}) shares one normaliser between softmax and linear "
                    f"scores, which needs a non-negative feature map (hedgehog, elu1, relu), got "
                    f"model.feature_map {self.feature_map}"
                )
        return p

    @property
    def memory_heads(self) -> int:
        """MoM's memory heads per head (the shared one included); 1 without MoM."""
        return self.mom_num_memories + int(self.mom_shared_memory) if self.mom_num_memories else 1

    @property
    def kv_copies(self) -> int:
        """Keys and values per key/value head and token: DeltaProduct's steps times MoM's memory heads."""
        return (self.num_householder if self.linear_variant == "deltaproduct" else 1) * self.memory_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    def mixer(self, layer: int) -> str:
        """'L' or 'S' for layer `layer`."""
        return self.layer_pattern[layer % len(self.layer_pattern)]


def matches_type(value, tp) -> bool:
    """`value` is of the annotated type `tp`: unions, Literals and None included; bool is no int and no
    float here, and a float field takes an int."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(matches_type(v, typing.get_args(tp)[0]) for v in value)
    if isinstance(value, bool):  # bool is an int in Python, never in a config
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


def type_name(tp) -> str:
    """How a problem names the annotated type `tp`: `int or null`, `one of 'lm', 'attention_transfer'`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def type_problems(obj, section: str) -> dict[str, str]:
    """Field -> problem for every field of the dataclass `obj` whose value has the wrong type, e.g.
    `model.num_heads: expected int, got str '4'` (bool is no int here; a float field takes an int)."""
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if not matches_type(value, tp):
            out[f.name] = f"{section}.{f.name}: expected {type_name(tp)}, got {type(value).__name__} {value!r}"
        elif isinstance(value, float) and not math.isfinite(value):
            out[f.name] = f"{section}.{f.name}: {value} is not a finite number"
    return out
