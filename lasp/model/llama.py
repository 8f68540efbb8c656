"""Linear-Llama on one device: Llama-3 blocks (RMSNorm, SwiGLU, no biases) with linear or softmax mixers.

Legend: B batch, T tokens, H query heads, Hkv key/value heads, D head dim.

Each mixer calls its attention through one slot, `attn_fn`, which defaults to the single-device op;
lasp.parallel fills it with the sequence-parallel op. Nothing here knows about ranks.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasp.kernels import linear_attn
from lasp.kernels.documents import Documents
from lasp.kernels.softmax_attn import softmax_attn
from lasp.model.config import ModelConfig
from lasp.model.config import GATED_VARIANTS
from lasp.model.layers import FEATURE_MAPS, LogGate, RMSNorm, SwiGLU, log_decay, rope


class _Projections(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.head_dim = D
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D] (local heads under TP)."""
        return tuple(p(x).unflatten(-1, (-1, self.head_dim)) for p in (self.q_proj, self.k_proj, self.v_proj))


class LinearAttention(_Projections):
    """Linear-attention mixer: feature map on q, k; a per-head decay or a data-dependent gate; optional
    per-head output norm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg)
        self.feature = FEATURE_MAPS[cfg.feature_map]
        self.out_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.output_norm else None
        g = log_decay(cfg.linear_variant, cfg.num_heads, layer, cfg.num_layers)
        self.register_buffer("log_decay", None if g is None else g.float(), persistent=False)
        self.gate = None
        if cfg.linear_variant in GATED_VARIANTS:
            self.gate = LogGate(cfg.linear_variant, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.gate_low_rank,
                                cfg.gate_normalizer)
        self.attn_fn = linear_attn

    def log_gates(self, x: Tensor) -> Tensor | None:
        """[B, T, H] or [B, T, H, D] log-gates in q's dtype, or None for a constant decay."""
        return None if self.gate is None else self.gate(x).to(x.dtype)

    def forward(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        q, k, v = self.qkv(x)
        gate = self.log_gates(x)
        kw = {} if gate is None else {"gate": gate}
        if documents is not None:
            kw["cu_seqlens"] = documents
        o = self.attn_fn(self.feature(q), self.feature(k), v, log_decay=self.log_decay, **kw)
        if self.out_norm is not None:
            o = self.out_norm(o)
        return self.o_proj(o.flatten(2))


class SoftmaxAttention(_Projections):
    """Causal softmax mixer with RoPE on global positions and GQA."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg)
        self.rope_theta = cfg.rope_theta
        self.attn_fn = softmax_attn

    def forward(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        q, k, v = self.qkv(x)
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        kw = {} if documents is None else {"cu_seqlens": documents}
        return self.o_proj(self.attn_fn(q, k, v, **kw).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        mixer = LinearAttention if cfg.mixer(layer) == "L" else SoftmaxAttention
        self.mixer = mixer(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        x = x + self.mixer(self.attn_norm(x), positions, documents)
        return x + self.mlp(self.mlp_norm(x))


class LinearLlama(nn.Module):
    """tokens [B, T] (and their global positions) -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None,
                      documents: Documents | None = None) -> Tensor:
        """tokens [B, T] -> final normed hidden states [B, T, hidden], the LM head's input (for
        `chunked_lm_loss_sum`, which never builds the logits of the whole sequence). `documents`: packed
        documents of the (global) rows: linear layers reset their state at every start and softmax layers
        do not attend across documents; positions then default to each token's place in its document."""
        if positions is None:
            positions = (torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens) if documents is None
                         else documents.positions(tokens.device))
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions, documents)
        return self.norm(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, documents: Documents | None = None) -> Tensor:
        return self.lm_head(self.hidden_states(tokens, positions, documents))

    @classmethod
    def from_pretrained(cls, directory, device="cpu", dtype: torch.dtype | None = None) -> "LinearLlama":
        """Load a directory written by `save_pretrained` (see lasp.model.pretrained)."""
        from lasp.model.pretrained import from_pretrained

        return from_pretrained(directory, device, dtype)

    def save_pretrained(self, directory, tokenizer: dict | None = None):
        """Write model.safetensors + config.json (+ tokenizer.json) to `directory` (see lasp.model.pretrained)."""
        from lasp.model.pretrained import save_pretrained

        return save_pretrained(self, directory, tokenizer)


def lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (labels already shifted; -100 is ignored), in float32 or better."""
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(lf.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
