"""Linear-Llama on one device: Llama-3 blocks (RMSNorm, SwiGLU, no biases) with linear or softmax mixers.

Legend: B batch, T tokens, H query heads, Hkv key/value heads, D head dim.

Each mixer calls its attention through one slot, `attn_fn`, which defaults to the single-device op;
lasp.parallel fills it with the sequence-parallel op. Nothing here knows about ranks.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasp.kernels import linear_attn
from lasp.kernels.documents import Documents
from lasp.kernels.softmax_attn import softmax_attn
from lasp.model.config import ModelConfig
from lasp.model.layers import (
    FEATURE_MAPS,
    LogGate,
    RMSNorm,
    ShortConv,
    SwiGLU,
    feature_map,
    log_decay,
    rope,
    rope_frequencies,
)
from lasp.model.moe import MoE
from lasp.model.mom import Router, run_memories
from lasp.model.variants import VARIANTS
from lasp.model.window import window_attention


class _Projections(nn.Module):
    """q, k, v and o projections (GQA), the per-head q/k norm (qk_norm) and RoPE of a mixer. Every mixer can
    compute the softmax attention of its own q, k, v (`teacher`): a softmax layer's output, and the target
    of a linearised layer in attention transfer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.head_dim, self.num_heads = D, H  # num_heads: the model's, whatever TP keeps here
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)
        self.rope_theta = cfg.rope_theta
        scaling = None
        if cfg.rope_scaling == "llama3":
            scaling = dict(
                factor=cfg.rope_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_positions=cfg.rope_original_max_positions,
            )
        dtype = torch.float32 if cfg.float32_norm_rope else torch.float64
        self.inv_freq_dtype = dtype  # kept through model.to(dtype): the angles' precision is the config's
        self.register_buffer("inv_freq", rope_frequencies(D, cfg.rope_theta, scaling, dtype), persistent=False)
        self.q_norm = RMSNorm(D, cfg.norm_eps, cfg.float32_norm_rope) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps, cfg.float32_norm_rope) if cfg.qk_norm else None
        self.teacher_fn = softmax_attn
        self.transfer: list[Tensor] | None = None
        """Attention transfer (lasp.parallel.loss): the squared errors of the forwards since the last reset."""

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D] (local heads under TP), q and k normed
        per head with qk_norm."""
        q, k, v = (p(x).unflatten(-1, (-1, self.head_dim)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(self.inv_freq_dtype)
        return rope(q, positions, self.rope_theta, inv), rope(k, positions, self.rope_theta, inv)

    def rotated_qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (normed per head with qk_norm, then RoPE at `positions`) and v."""
        q, k, v = self.qkv(x)
        return *self.rotate(q, k, positions), v

    def teacher(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        """Causal softmax attention of this layer's q, k, v: [B, T, H, D], before o_proj."""
        kw = {} if documents is None else {"cu_seqlens": documents}
        return self.teacher_fn(*self.rotated_qkv(x, positions), **kw)

    def transferred(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        """Attention transfer: record the squared error of this linear layer's output (before o_proj, from
        detached inputs) against its softmax teacher's, summed over tokens and averaged over the model's
        heads and dims; pass the TEACHER's output on, so every layer learns on the inputs it had."""
        with torch.no_grad():
            target = self.teacher(x, positions, documents)
        student = self.attend(x.detach(), positions, documents)
        err = student - target
        err = err.float() if err.dtype in (torch.float16, torch.bfloat16) else err
        self.transfer.append(err.pow(2).sum() / (self.num_heads * self.head_dim))
        return self.o_proj(target.flatten(2))

    as_teacher = False
    """True inside `softmax_teacher`: this mixer computes the softmax attention of its own q, k, v."""

    def forward(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        if self.as_teacher:
            return self.o_proj(self.teacher(x, positions, documents).flatten(2))
        if self.transfer is not None:
            return self.transferred(x, positions, documents)
        return self.o_proj(self.attend(x, positions, documents).flatten(2))


@contextlib.contextmanager
def softmax_teacher(module: nn.Module):
    """Within it, `module` (a model or a pipeline stage) is the original softmax model its weights came
    from: every mixer the causal softmax attention of its own q, k, v (no linear branch, no window), every
    LoRA adapter off. For KL distillation to that teacher (train.distill_weight)."""
    mixers = [m for m in module.modules() if isinstance(m, _Projections)]
    adapters = [m for m in module.modules() if hasattr(m, "lora_A")]
    for m in mixers:
        m.as_teacher = True
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for m in mixers:
            m.as_teacher = False
        for a in adapters:
            a.enabled = True


class LinearAttention(_Projections):
    """Linear-attention mixer: feature map on q, k (RoPE'd first with linear_rope); a per-head decay or a
    data-dependent gate (its own projection, or Liger's pooled key); optional per-head output norm; with
    model.window, an exact softmax window beside the linear branch (lasp.model.window).

    `attn_fn` is the op (linear_attn, or LASP-2 under SP); `halo_fn(x [B, T, C], rows)` gives the rows
    before each local chunk for the window ([n, B, rows, C]; zeros on one device, lasp.sp.halo under SP)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg)
        self.feature = FEATURE_MAPS.get(cfg.feature_map)
        self.feature_q = feature_map(cfg.feature_map, cfg.num_heads, cfg.head_dim)
        self.feature_k = feature_map(cfg.feature_map, cfg.num_kv_heads, cfg.head_dim)
        self.linear_rope, self.window = cfg.linear_rope, cfg.window
        self.out_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.output_norm else None
        g = log_decay(cfg.linear_variant, cfg.num_heads, layer, cfg.num_layers)
        self.register_buffer("log_decay", None if g is None else g.float(), persistent=False)
        self.gate = self.key_gate = None
        self.router = _router(cfg)
        m = cfg.memory_heads  # MoM: a gate per memory head
        _widen_kv(self, cfg)
        variant = VARIANTS[cfg.linear_variant]
        if variant.decay == "gate" and cfg.gate_source == "key":
            self.key_gate = (variant.gate == "vector", cfg.gate_normalizer)
        elif variant.decay == "gate":
            self.gate = LogGate(
                cfg.linear_variant,
                cfg.hidden_size,
                cfg.num_heads * m,
                cfg.head_dim,
                cfg.gate_low_rank,
                cfg.gate_normalizer,
            )
        self.window_share = None
        if cfg.window:  # LoLCATs' window factor: sigmoid(0) = 1/2, the window's and the linear branch's share
            self.window_share = nn.Parameter(torch.zeros(cfg.num_heads))
            self.window_share.no_weight_decay = True
        self.attn_fn = linear_attn
        self.halo_fn = None

    def log_gates(self, x: Tensor, k: Tensor) -> Tensor | None:
        """[B, T, H] or [B, T, H, D] log-gates in x's dtype from x or from the (normed) keys k, or None for a
        constant decay."""
        if self.key_gate is not None:  # Liger: logsigmoid of the key (pooled over the head dim) / normalizer
            vector, normalizer = self.key_gate
            kf = k.float() if k.dtype in (torch.float16, torch.bfloat16) else k
            g = F.logsigmoid(kf if vector else kf.mean(-1)) / normalizer
            return g.repeat_interleave(self.q_proj.weight.shape[0] // k.shape[2] // self.head_dim, 2).to(x.dtype)
        return None if self.gate is None else self.gate(x).to(x.dtype)

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.feature_q is not None:
            return self.feature_q(q), self.feature_k(k)
        return self.feature(q), self.feature(k)

    def linear_inputs(self, x: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        """q, k (RoPE'd when linear_rope or a window needs them), v, the features of q and k, the gate."""
        q, k, v = self.qkv(x)
        gate = self.log_gates(x, k)
        if self.linear_rope or self.window:
            q, k = self.rotate(q, k, positions)
        return q, k, v, *self.features(q, k), gate

    def halo(self, x: Tensor, rows: int) -> Tensor:
        return x.new_zeros(1, x.shape[0], rows, x.shape[2]) if self.halo_fn is None else self.halo_fn(x, rows)

    def attend(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        """The output before o_proj, [B, T, H, D]."""
        q, k, v, fq, fk, gate = self.linear_inputs(x, positions)
        kw = {} if gate is None else {"gate": gate}
        if documents is not None:
            kw["cu_seqlens"] = documents
        if self.router is not None:
            o = run_memories(self.attn_fn, fq, fk, v, kw.pop("gate"), self.router(x), **kw)
        elif not self.window:
            o = self.attn_fn(fq, fk, v, log_decay=self.log_decay, **kw)
        else:
            ones = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
            linear = self.attn_fn(fq, fk, ones, log_decay=self.log_decay, scale=1.0, **kw)
            o = window_attention(
                q,
                k,
                v,
                fq,
                fk,
                linear,
                window=self.window,
                positions=positions,
                halo=self.halo,
                share=torch.sigmoid(self.window_share),
                log_decay=self.log_decay,
                gate=gate,
            )
        return o if self.out_norm is None else self.out_norm(o)


def _router(cfg: ModelConfig) -> Router | None:
    """MoM's router, or None without model.mom_num_memories."""
    if not cfg.mom_num_memories:
        return None
    return Router(cfg.hidden_size, cfg.mom_num_memories, cfg.mom_top_k, cfg.mom_shared_memory)


def _widen_kv(mixer: _Projections, cfg: ModelConfig) -> None:
    """cfg.kv_copies keys and values per key/value head and token (DeltaProduct's steps, MoM's memories), in
    (head, copy) order so that tensor parallelism's split by heads keeps each head's copies together."""
    if cfg.kv_copies > 1:
        width = cfg.num_kv_heads * cfg.kv_copies * cfg.head_dim
        mixer.k_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.attention_bias)
        mixer.v_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.attention_bias)


def _inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Mamba's dt_bias initialisation (flash-linear-attention's GatedDeltaNet): dt log-uniform in [dt_min,
    dt_max], floored, stored as its inverse softplus."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class DeltaNetAttention(_Projections):
    """Delta-rule mixer, as flash-linear-attention's DeltaNet / GatedDeltaNet / KDA layers: q, k, v through
    a short causal convolution (SiLU), q and k L2-normalised per head; beta = sigmoid(W_b x) (times 2 with
    allow_neg_eigval); Gated DeltaNet's log-gate -exp(A_log) softplus(W_a x + dt_bias) per head, KDA's per
    key dim through a low-rank projection; then RMSNorm(o) * SiLU(W_g x) per head and o_proj.

    `attn_fn` is the op (linear_attn, or LASP-2 under SP); `halo_fn(x [B, T, C], rows)` gives the rows
    before each local chunk for the convolution ([n, B, rows, C]; zeros on one device, lasp.sp.halo
    under SP)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg)
        H, Hkv, D, hidden = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.neg_eigval, self.conv_size = cfg.allow_neg_eigval, cfg.conv_size
        self.householder = cfg.num_householder if cfg.linear_variant == "deltaproduct" else 1
        self.router = _router(cfg)
        m, c = cfg.memory_heads, cfg.kv_copies  # memory heads per head; keys, values and betas per head and token
        _widen_kv(self, cfg)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(n, cfg.conv_size) for n in (H * D, Hkv * c * D, Hkv * c * D))
        self.b_proj = nn.Linear(hidden, H * c, bias=False)
        self.a_proj = self.f_down = None
        gate = VARIANTS[cfg.linear_variant].gate
        if gate == "scalar":  # Gated DeltaNet, Gated DeltaProduct
            self.a_proj = nn.Linear(hidden, H * m, bias=False)
        elif gate == "vector":  # KDA
            self.f_down = nn.Linear(hidden, cfg.gate_low_rank, bias=False)
            self.a_proj = nn.Linear(cfg.gate_low_rank, H * m * D, bias=False)
        if self.a_proj is not None:
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
            self.dt_bias = nn.Parameter(_inverse_softplus_dt(self.a_proj.out_features))
            self.A_log.no_weight_decay = self.dt_bias.no_weight_decay = True
        self.g_proj = nn.Linear(hidden, H * D, bias=False)
        self.out_norm = RMSNorm(D, cfg.norm_eps)
        self.attn_fn = linear_attn
        self.halo_fn = None

    def halo(self, x: Tensor) -> Tensor:
        rows = self.conv_size - 1
        if self.halo_fn is None:
            return x.new_zeros(1, x.shape[0], rows, x.shape[2])
        return self.halo_fn(x, rows)

    def beta_gate(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """beta [B, T, H] and the log-gate ([B, T, H], [B, T, H, D] or None), computed in float32 or better."""
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        beta = torch.sigmoid(self.b_proj(x).to(xf.dtype)) * (2.0 if self.neg_eigval else 1.0)
        if self.a_proj is None:
            return beta.to(x.dtype), None
        z = self.a_proj(x if self.f_down is None else self.f_down(x)).to(xf.dtype) + self.dt_bias.to(xf.dtype)
        H = self.A_log.shape[0]
        g = -torch.exp(self.A_log.to(xf.dtype)).repeat_interleave(z.shape[-1] // H) * F.softplus(z)
        return beta.to(x.dtype), (g if self.f_down is None else g.unflatten(-1, (-1, self.head_dim))).to(x.dtype)

    def projections(self, x: Tensor) -> list[Tensor]:
        """q, k, v before their convolutions, [B, T, channels] each."""
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x)]

    def mixed(
        self, x: Tensor, positions: Tensor, halos=None, ys=None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """q [B, T, H, D], k (convolved, L2-normalised) and v (convolved) [B, T, Hkv x copies, D], beta
        [B, T, H x copies] and the gate [B, T, H x memories(, D)] (copies: DeltaProduct's steps times MoM's
        memories per head, in (head, copy) order; 1 and 1 otherwise). `ys`: the
        projections if already made; `halos`: the rows before x for q, k and v's convolutions (decoding),
        else from `halo_fn`."""
        ys = self.projections(x) if ys is None else ys
        convs = (self.q_conv, self.k_conv, self.v_conv)
        q, k, v = (
            conv(y, positions, self.halo(y) if halos is None else halo).unflatten(-1, (-1, self.head_dim))
            for conv, y, halo in zip(convs, ys, halos or [None] * 3)
        )
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        return q, k, v, *self.beta_gate(x)

    def gated(self, o: Tensor, x: Tensor) -> Tensor:
        """RMSNorm(o) * SiLU(W_g x) per head, [B, T, H, D]."""
        return self.out_norm(o) * F.silu(self.g_proj(x).unflatten(-1, (-1, self.head_dim)))

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """The gated output through o_proj."""
        return self.o_proj(self.gated(o, x).flatten(2))

    def core(self, fn, x: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, gate: Tensor | None, **kw):
        """`fn` (the op, or linear_attn when decoding) on `mixed`'s outputs: DeltaProduct's steps as rows of
        their own (k, v [B, T, Hkv x n, D] -> [B, T x n, Hkv, D]), MoM's memories as heads (lasp.model.mom)."""
        n = self.householder
        if n > 1:
            k, v = (y.unflatten(2, (-1, n)).transpose(2, 3).flatten(1, 2) for y in (k, v))
            beta = beta.unflatten(2, (-1, n)).transpose(2, 3).flatten(1, 2)
            return fn(q, k, v, beta=beta, gate=gate, householder=n, **kw)
        if self.router is not None:
            return run_memories(fn, q, k, v, gate, self.router(x), beta=beta, **kw)
        return fn(q, k, v, beta=beta, gate=gate, **kw)

    def attend(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        """The output before o_proj, [B, T, H, D]."""
        kw = {} if documents is None else {"cu_seqlens": documents}
        return self.gated(self.core(self.attn_fn, x, *self.mixed(x, positions), **kw), x)


class SoftmaxAttention(_Projections):
    """Causal softmax mixer with RoPE on global positions and GQA."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg)
        self.attn_fn = softmax_attn

    def attend(self, x: Tensor, positions: Tensor, documents: Documents | None = None) -> Tensor:
        kw = {} if documents is None else {"cu_seqlens": documents}
        return self.attn_fn(*self.rotated_qkv(x, positions), **kw)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.float32_norm_rope)
        if cfg.mixer(layer) == "S":
            mixer = SoftmaxAttention
        else:
            mixer = DeltaNetAttention if VARIANTS[cfg.linear_variant].delta else LinearAttention
        self.mixer = mixer(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.float32_norm_rope)
        moe = cfg.moe is not None and cfg.moe.is_moe(layer)
        self.mlp = MoE(cfg.hidden_size, cfg.moe) if moe else SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

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
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.float32_norm_rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.lora_rank:
            from lasp.model.lora import add_lora

            add_lora(self, cfg)

    def hidden_states(
        self, tokens: Tensor, positions: Tensor | None = None, documents: Documents | None = None
    ) -> Tensor:
        """tokens [B, T] -> final normed hidden states [B, T, hidden], the LM head's input (for
        `chunked_lm_loss_sum`, which never builds the logits of the whole sequence). `documents`: packed
        documents of the (global) rows: linear layers reset their state at every start and softmax layers
        do not attend across documents; positions then default to each token's place in its document."""
        if positions is None:
            positions = (
                torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
                if documents is None
                else documents.positions(tokens.device)
            )
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions, documents)
        return self.norm(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, documents: Documents | None = None) -> Tensor:
        return self.lm_head(self.hidden_states(tokens, positions, documents))


def lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (labels already shifted; -100 is ignored), in float32 or better."""
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(lf.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
