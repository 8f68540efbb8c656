"""Model configuration: a typed dataclass, one docstring per field, every problem reported at once."""

from dataclasses import dataclass

LINEAR_VARIANTS = ("basic", "lightning", "retention")
FEATURE_MAPS = ("identity", "elu1", "relu", "silu")


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
    """Decay of linear attention: basic (none), lightning (per-head slopes, TNL), retention (RetNet)."""
    feature_map: str = "identity"
    """Map applied to q and k before linear attention: identity, elu1, relu, silu."""
    output_norm: bool = True
    """RMS-normalise the linear-attention output per head before the output projection."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    rope_theta: float = 10000.0
    """RoPE base of the softmax layers (positions are global token positions)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        p = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                p.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            p.append(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            p.append(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "S"}:
            p.append(f"model.layer_pattern must be a non-empty string of L and S, got {self.layer_pattern!r}")
        if self.linear_variant not in LINEAR_VARIANTS:
            p.append(f"model.linear_variant must be one of {', '.join(LINEAR_VARIANTS)}, got {self.linear_variant!r}")
        if self.feature_map not in FEATURE_MAPS:
            p.append(f"model.feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 2:
            p.append(f"head dim {self.hidden_size // self.num_heads} must be even for RoPE")
        return p

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def mixer(self, layer: int) -> str:
        """'L' or 'S' for layer `layer`."""
        return self.layer_pattern[layer % len(self.layer_pattern)]
