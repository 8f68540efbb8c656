"""Incremental decoding of a LinearLlama on one device: a fixed-size state per linear layer, a KV cache per
softmax layer, and sampling (greedy, temperature, top-p).

Legend: B batch, T tokens, H query heads, Hkv key/value heads, D head dim (K = V = D in linear layers),
Vocab vocabulary size.

A linear layer's whole past is its state S [B, H, K, V] (docs/design.md, "The math"): one token is the
recurrence S = lambda S + k v^T, o = s q^T S; several tokens at once (a prompt) go through the chunked
single-device op `linear_attn` started from S, which returns the same final state in closed form. A
delta-rule layer keeps S and its convolutions' last conv_size - 1 inputs (`DeltaState`) and runs every
step through `linear_attn(beta=...)` from S. A linear layer with a window (model.window) keeps its
state over [v, 1] and the last window - 1 rows of its keys, values, features and gates (`WindowState`),
which stand in for the halo of lasp.model.window. A softmax layer appends its RoPE'd keys and values at
their global positions and attends end-aligned.
Decoding calls the kernels directly, never a mixer's `attn_fn` slot, so it does not matter what a
parallelised model put there.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lasp.kernels import linear_attn, state_dtype
from lasp.kernels.softmax_attn import softmax_attn
from lasp.model.config import ModelConfig
from lasp.model.llama import DeltaNetAttention, LinearAttention, LinearLlama, SoftmaxAttention
from lasp.model.mom import run_memories
from lasp.model.variants import VARIANTS
from lasp.model.window import window_attention


class KVCache:
    """RoPE'd keys and values of one softmax layer: k, v [B, capacity, Hkv, D], the first `length` used.
    Capacity grows by doubling when a step needs more (give the final length up front to avoid copies)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        self.k = torch.empty(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k_BTHD: Tensor, v_BTHD: Tensor) -> tuple[Tensor, Tensor]:
        """Add T tokens; return the keys and values of every token so far, [B, length, Hkv, D] each."""
        end = self.length + k_BTHD.shape[1]
        if end > self.k.shape[1]:
            cap = max(end, 2 * self.k.shape[1])
            grown = [x.new_empty(x.shape[0], cap, *x.shape[2:]) for x in (self.k, self.v)]
            for new, old in zip(grown, (self.k, self.v)):
                new[:, : self.length] = old[:, : self.length]
            self.k, self.v = grown
        self.k[:, self.length : end] = k_BTHD
        self.v[:, self.length : end] = v_BTHD
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the used length)."""
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class DeltaState:
    """What a delta-rule layer keeps of the past: its state S [B, H, K, V] (the state dtype) and the last
    conv_size - 1 inputs of each of its three convolutions (q, k, v: [B, conv_size - 1, channels], the
    weights' dtype). Constant in size."""

    S: Tensor
    conv: list[Tensor]

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.S, *self.conv))


@dataclass
class WindowState:
    """A linear layer with a window: the state S [B, H, K, D + 1] of the linear branch over every token so far
    (values with a column of ones: the normaliser) and `rows` [B, window - 1, C], the last window - 1 tokens'
    RoPE'd keys, values, key features and gates, as lasp.model.window concatenates them."""

    S: Tensor
    rows: Tensor

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.S, self.rows))

    def halo(self, x: Tensor, rows: int) -> Tensor:
        """The rows before x [B, T, C] (the window's halo, [1, B, rows, C]); keeps x's last rows for next time."""
        before = self.rows
        both = torch.cat([before, x.to(before.dtype)], dim=1)
        self.rows = both[:, both.shape[1] - rows :]
        return before[None]


def _window_channels(cfg: ModelConfig) -> int:
    """Channels of a window layer's rows: keys and values (Hkv x D each), key features, a scalar gate."""
    F = 2 * cfg.head_dim if cfg.feature_map == "hedgehog" else cfg.head_dim
    gate = cfg.num_heads if VARIANTS[cfg.linear_variant].gate == "scalar" else 0  # the gates a window keeps
    return cfg.num_kv_heads * (2 * cfg.head_dim + F) + gate


def _linear_state_shape(cfg: ModelConfig, batch: int) -> tuple[int, ...]:
    K = 2 * cfg.head_dim if cfg.feature_map == "hedgehog" else cfg.head_dim
    return batch, cfg.num_heads * cfg.memory_heads, K, cfg.head_dim + (1 if cfg.window else 0)


@dataclass
class DecodeState:
    """Everything a LinearLlama needs of the past: per layer a linear state [B, H, K, V] (float32, or float64
    for a float64 model) or a KVCache; `position` = tokens consumed (the next token's global position)."""

    layers: list
    batch: int
    position: int = 0

    @classmethod
    def empty(cls, model: LinearLlama, batch: int, capacity: int = 0) -> "DecodeState":
        """The state before any token; `capacity` pre-allocates the KV caches for that many tokens."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        cfg, w = model.cfg, model.embed.weight
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        layers = []
        for block in model.layers:
            if isinstance(block.mixer, DeltaNetAttention):
                S = torch.zeros(batch, H * cfg.memory_heads, D, D, dtype=state_dtype(w.dtype), device=w.device)
                conv = [
                    torch.zeros(batch, cfg.conv_size - 1, c, dtype=w.dtype, device=w.device)
                    for c in (H * D, Hkv * cfg.kv_copies * D, Hkv * cfg.kv_copies * D)
                ]
                layers.append(DeltaState(S, conv))
            elif isinstance(block.mixer, LinearAttention):
                S = torch.zeros(_linear_state_shape(cfg, batch), dtype=state_dtype(w.dtype), device=w.device)
                layers.append(
                    S
                    if not cfg.window
                    else WindowState(
                        S, torch.zeros(batch, cfg.window - 1, _window_channels(cfg), dtype=w.dtype, device=w.device)
                    )
                )
            else:
                layers.append(KVCache(batch, Hkv, D, w.dtype, w.device, capacity))
        return cls(layers, batch)

    def nbytes(self) -> int:
        """Bytes held by the state (linear states plus allocated KV caches)."""
        return sum(
            s.nbytes() if isinstance(s, (KVCache, DeltaState, WindowState)) else s.numel() * s.element_size()
            for s in self.layers
        )


@dataclass(frozen=True)
class DecodeMemory:
    """Decoding memory of one sequence: `fixed_bytes` (linear states, independent of length) plus
    `per_token_bytes` for every token held (each softmax layer keeps 2 * Hkv * D values per token). A
    delta-rule layer's fixed part includes its convolutions' last conv_size - 1 inputs."""

    fixed_bytes: int
    per_token_bytes: int

    def at(self, tokens: int, batch: int = 1) -> int:
        """Bytes of the state of `batch` sequences of `tokens` tokens each."""
        return batch * (self.fixed_bytes + tokens * self.per_token_bytes)


def decode_memory(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> DecodeMemory:
    """Decoding-state bytes of a model of shape `cfg` whose weights (and KV cache) are in `dtype`."""
    D = cfg.head_dim
    kinds = [cfg.mixer(i) for i in range(cfg.num_layers)]
    state_item = torch.empty((), dtype=state_dtype(dtype)).element_size()
    kv_item = torch.empty((), dtype=dtype).element_size()
    extra = 0
    if VARIANTS[cfg.linear_variant].delta:
        extra = (cfg.conv_size - 1) * (cfg.num_heads + 2 * cfg.num_kv_heads * cfg.kv_copies) * D * kv_item
    if cfg.window:
        extra = (cfg.window - 1) * _window_channels(cfg) * kv_item
    _, H, K, V = _linear_state_shape(cfg, 1)
    return DecodeMemory(
        fixed_bytes=kinds.count("L") * (H * K * V * state_item + extra),
        per_token_bytes=kinds.count("S") * 2 * cfg.num_kv_heads * D * kv_item,
    )


def forward_memory(
    cfg: ModelConfig,
    dtype: torch.dtype,
    tokens: int,
    *,
    logits_tokens: int | None = None,
    held_tokens: int = 0,
    batch: int = 1,
) -> int:
    """A lower bound on the bytes an inference forward of `tokens` new tokens per sequence needs, beyond the
    weights: what exists at once when the LM head runs. That is the decode state holding `held_tokens`
    tokens (`decode_memory`; 0 for a plain forward), the final hidden states (hidden values per token), the
    logits of `logits_tokens` positions (vocab values each; default all `tokens`, generation keeps only the
    last) and the tokens' ids and positions (int64). Values are `dtype`'s size. A layer's temporaries and
    kernel workspaces are left out, so a request above this cannot run and one below it may still not fit:
    the CLIs refuse only the first kind (lasp.generate, lasp.eval passkey)."""
    item = torch.empty((), dtype=dtype).element_size()
    logits_tokens = tokens if logits_tokens is None else logits_tokens
    state = decode_memory(cfg, dtype).at(held_tokens, batch) if held_tokens else 0
    return state + batch * (tokens * (cfg.hidden_size * item + 16) + logits_tokens * cfg.vocab_size * item)


FLOAT32_EXACT_POSITIONS = 2**24
"""float32 holds every whole number up to 2**24, and rounds larger ones to a multiple of 2 or more."""


def position_limit(cfg: ModelConfig) -> int | None:
    """The most tokens one sequence can hold, None for no limit. RoPE angles in float32
    (model.float32_norm_rope) see positions past 2**24 rounded onto their neighbours: two tokens would share
    one rotation. The default float64 angles are exact to 2**53, beyond any memory."""
    rotates = "S" in cfg.layer_pattern or cfg.linear_rope or cfg.window > 0
    return FLOAT32_EXACT_POSITIONS if rotates and cfg.float32_norm_rope else None


def check_positions(cfg: ModelConfig, tokens: int, what: str) -> None:
    """ValueError when `what` (`tokens` positions of one sequence) passes `position_limit`."""
    limit = position_limit(cfg)
    if limit is not None and tokens > limit:
        raise ValueError(
            f"{what} need {tokens:,} positions, more than the {limit:,} this model tells apart: its "
            "RoPE angles are float32 (model.float32_norm_rope), which rounds larger positions onto "
            "their neighbours"
        )


def linear_step(
    q_BHK: Tensor,
    k_BHK: Tensor,
    v_BHV: Tensor,
    log_decay_H: Tensor | None,
    state_BHKV: Tensor,
    scale: float | None = None,
    gate: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of causal linear attention: S' = lambda S + k v^T, o = s q^T S' (current token included).
    `gate` (log-gates [B, H] or [B, H, K], instead of the decay): S' = Diag(exp(g)) S + k v^T.

    k, v may have Hkv < H heads (query head h reads kv head h // (H / Hkv), as `linear_attn`); scale
    defaults to K**-0.5. Returns (o [B, H, V] in q's dtype, S' [B, H, K, V] in the state's dtype).
    """
    H, K = q_BHK.shape[1], q_BHK.shape[2]
    if k_BHK.shape[1] != H:
        k_BHK = k_BHK.repeat_interleave(H // k_BHK.shape[1], dim=1)
        v_BHV = v_BHV.repeat_interleave(H // v_BHV.shape[1], dim=1)
    dt = state_BHKV.dtype
    S = state_BHKV
    if log_decay_H is not None:
        S = S * torch.exp(log_decay_H.to(dt))[None, :, None, None]
    if gate is not None:
        S = S * torch.exp(gate.to(dt) if gate.dim() == 3 else gate.to(dt)[..., None])[..., None]
    S = S + k_BHK.to(dt)[..., :, None] * v_BHV.to(dt)[..., None, :]
    scale = K**-0.5 if scale is None else scale
    o = scale * torch.einsum("bhk,bhkv->bhv", q_BHK.to(dt), S)
    return o.to(q_BHK.dtype), S


def _linear_mixer(
    m: LinearAttention, x: Tensor, S: Tensor | WindowState, positions_BT: Tensor
) -> tuple[Tensor, Tensor | WindowState]:
    q_r, k_r, v, q, k, g = m.linear_inputs(x, positions_BT)
    if m.window:
        ones = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
        linear, S.S = linear_attn(
            q, k, ones, log_decay=m.log_decay, gate=g, scale=1.0, initial_state=S.S, output_final_state=True
        )
        o = window_attention(
            q_r,
            k_r,
            v,
            q,
            k,
            linear,
            window=m.window,
            positions=positions_BT,
            halo=S.halo,
            share=torch.sigmoid(m.window_share),
            log_decay=m.log_decay,
            gate=g,
        )
    elif m.router is not None:  # MoM: the memories as heads
        o, S = run_memories(linear_attn, q, k, v, g, m.router(x), initial_state=S, output_final_state=True)
    elif x.shape[1] == 1:
        o, S = linear_step(q[:, 0], k[:, 0], v[:, 0], m.log_decay, S, gate=None if g is None else g[:, 0])
        o = o[:, None]
    else:
        o, S = linear_attn(q, k, v, log_decay=m.log_decay, gate=g, initial_state=S, output_final_state=True)
    if m.out_norm is not None:
        o = m.out_norm(o)
    return m.o_proj(o.flatten(2)), S


def _delta_mixer(m: DeltaNetAttention, x: Tensor, st: DeltaState, positions_BT: Tensor) -> Tensor:
    """T new tokens through a delta-rule layer from `st`, which moves past them."""
    ys = m.projections(x)
    rows = m.conv_size - 1
    q, k, v, beta, gate = m.mixed(x, positions_BT, halos=[c[None] for c in st.conv], ys=ys)
    for i, (c, y) in enumerate(zip(st.conv, ys)):
        both = torch.cat([c, y.to(c.dtype)], dim=1)
        st.conv[i] = both[:, both.shape[1] - rows :]
    o, st.S = m.core(linear_attn, x, q, k, v, beta, gate, initial_state=st.S, output_final_state=True)
    return m.output(o, x)


def _softmax_mixer(m: SoftmaxAttention, x: Tensor, cache: KVCache, positions_BT: Tensor) -> Tensor:
    q, k, v = m.rotated_qkv(x, positions_BT)
    k_all, v_all = cache.append(k, v)
    # one query sees every cached key: no mask needed; several are masked end-aligned
    o = softmax_attn(q, k_all, v_all, causal=x.shape[1] > 1)
    return m.o_proj(o.flatten(2))


def check_token_ids(tokens: Tensor, vocab_size: int, what: str = "tokens") -> None:
    """Integer ids in [0, vocab_size) of shape [B, T] with T >= 1; a clear error otherwise."""
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() != 2:
        raise ValueError(f"{what} must be integer ids of shape [B, T], got {tokens.dtype} {tuple(tokens.shape)}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"{what} must hold at least one token per sequence, got shape {tuple(tokens.shape)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} must be ids in [0, {vocab_size}) (the model's vocab_size), got min {lo}, max {hi}")


@torch.no_grad()
def decode_step(model: LinearLlama, tokens_BT: Tensor, state: DecodeState, last_only: bool = False) -> Tensor:
    """Feed T new tokens (a prompt, or one sampled token) and advance `state` past them.

    Returns the logits [B, T, Vocab] of those tokens (only the last position, [B, 1, Vocab], with
    `last_only`), equal to what `model(all tokens so far)` gives at the same positions.
    """
    check_token_ids(tokens_BT, model.cfg.vocab_size)
    B, T = tokens_BT.shape
    if B != state.batch:
        raise ValueError(f"tokens have batch {B} but the decode state was made for batch {state.batch}")
    if len(state.layers) != len(model.layers):
        raise ValueError(f"decode state has {len(state.layers)} layers, the model {len(model.layers)}")
    check_positions(model.cfg, state.position + T, f"{state.position:,} tokens decoded and {T:,} more")
    positions = (state.position + torch.arange(T, device=tokens_BT.device)).expand(B, T)
    x = model.embed(tokens_BT)
    for i, block in enumerate(model.layers):
        h = block.attn_norm(x)
        if isinstance(block.mixer, DeltaNetAttention):
            y = _delta_mixer(block.mixer, h, state.layers[i], positions)
        elif isinstance(block.mixer, LinearAttention):
            y, state.layers[i] = _linear_mixer(block.mixer, h, state.layers[i], positions)
        elif isinstance(block.mixer, SoftmaxAttention):
            y = _softmax_mixer(block.mixer, h, state.layers[i], positions)
        else:
            raise TypeError(f"layer {i}: cannot decode a {type(block.mixer).__name__} mixer")
        x = x + y
        x = x + block.mlp(block.mlp_norm(x))
    state.position += T
    if last_only:
        x = x[:, -1:]
    return model.lm_head(model.norm(x))


def check_sampling(temperature: float, top_p: float) -> None:
    """temperature finite and >= 0 (0 = greedy; inf would sample uniformly) and top_p in (0, 1]; a clear
    error otherwise."""
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits_BV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Next ids [B] from logits [B, Vocab]: argmax at temperature 0, otherwise a draw from the softmax of
    logits / temperature restricted to the smallest set of most likely tokens whose mass reaches top_p."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits_BV.argmax(-1)
    acc = torch.float64 if logits_BV.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits_BV.to(acc) / temperature, dim=-1)
    if top_p == 1:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    p, idx = probs.sort(dim=-1, descending=True)
    p = p * ((p.cumsum(-1) - p) < top_p)  # a token is kept while the mass before it is short of top_p
    return idx.gather(-1, torch.multinomial(p, 1, generator=generator))[:, 0]


def generate(
    model: LinearLlama,
    prompt_ids: Tensor | list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_p: float = 0.95,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    state: DecodeState | None = None,
) -> Iterator[Tensor]:
    """Yield the new ids [B] one step at a time after prefilling `prompt_ids` ([B, T], [T] or a list).

    Stops after `max_new_tokens`, or once every sequence has produced `eos_id` (that EOS is yielded;
    a finished sequence yields `eos_id` while others go on). Pass `state` (a `DecodeState.empty` of the
    prompt's batch) to read its size afterwards. Arguments are checked here, before the first step.
    """
    check_sampling(temperature, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.embed.weight.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.numel() == 0:
        raise ValueError(f"the prompt is empty (shape {tuple(prompt.shape)}): give at least one token")
    check_token_ids(prompt, model.cfg.vocab_size, "prompt ids")
    if eos_id is not None and not 0 <= eos_id < model.cfg.vocab_size:
        raise ValueError(f"eos_id must be in [0, {model.cfg.vocab_size}), got {eos_id}")
    done = 0 if state is None else state.position  # the last sampled token is never fed back
    check_positions(
        model.cfg,
        done + prompt.shape[1] + max(max_new_tokens - 1, 0),
        f"the prompt ({prompt.shape[1]:,} tokens) and max_new_tokens ({max_new_tokens:,})",
    )
    if state is None:
        state = DecodeState.empty(model, prompt.shape[0], capacity=prompt.shape[1] + max_new_tokens)
    return _generate(model, prompt, max_new_tokens, temperature, top_p, generator, eos_id, state)


def _generate(model, prompt, max_new_tokens, temperature, top_p, generator, eos_id, state) -> Iterator[Tensor]:
    if max_new_tokens == 0:
        return
    logits = decode_step(model, prompt, state, last_only=True)[:, -1]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        ids = sample(logits, temperature, top_p, generator)
        if eos_id is not None:
            ids = torch.where(done, eos_id, ids)
            done |= ids == eos_id
        yield ids
        if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            return
        logits = decode_step(model, ids[:, None], state)[:, -1]
