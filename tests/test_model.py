"""Single-device Linear-Llama: config checks, mixer pattern, decays, causality, tied embeddings."""

import pytest
import torch

from lasp.model import LinearAttention, LinearLlama, ModelConfig, SoftmaxAttention, lm_loss_sum
from lasp.model.layers import LogGate, log_decay
from lasp.model.llama import DeltaNetAttention
from lasp.model.variants import FEATURE_MAPS, VARIANTS
from lasp.train.flops import param_counts


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as e:
        ModelConfig(hidden_size=66, num_heads=4, num_kv_heads=3, layer_pattern="LXS", feature_map="tanh")
    msg = str(e.value)
    for part in [
        "hidden_size (66) must be divisible by model.num_heads (4)",
        "multiple of model.num_kv_heads (3)",
        "layer_pattern",
        "feature_map",
    ]:
        assert part in msg


def _model_problems(**kw) -> str:
    with pytest.raises(ValueError) as e:
        ModelConfig(**kw)
    return str(e.value)


@pytest.mark.parametrize(
    "value, shown", [("4", "str '4'"), (2.5, "float 2.5"), (True, "bool True")], ids=["str", "float", "bool"]
)
def test_an_int_field_of_another_type_is_named_with_its_value(value, shown):
    assert f"model.num_heads: expected int, got {shown}" in _model_problems(num_heads=value)


def test_every_field_type_is_checked():
    msg = _model_problems(feature_map=3, output_norm=1, norm_eps="1e-5", layer_pattern=None)
    for part in [
        "model.feature_map: expected str, got int 3",
        "model.output_norm: expected bool, got int 1",
        "model.norm_eps: expected float, got str '1e-5'",
        "model.layer_pattern: expected str, got NoneType",
    ]:
        assert part in msg, msg
    assert ModelConfig(rope_theta=500000, norm_eps=1, init_std=0).rope_theta == 500000  # a float field takes an int


def test_sizes_below_one_and_the_later_checks_all_reported():
    msg = _model_problems(
        num_heads=0,
        num_kv_heads=-1,
        vocab_size="256",
        norm_eps=0.0,
        rope_theta=-1.0,
        feature_map="tanh",
        layer_pattern="LXS",
    )
    for part in [
        "model.num_heads must be >= 1, got 0",
        "model.num_kv_heads must be >= 1, got -1",
        "model.vocab_size: expected int, got str '256'",
        "model.norm_eps must be > 0, got 0.0",
        "model.rope_theta must be > 0, got -1.0",
        "model.feature_map",
        "model.layer_pattern",
    ]:
        assert part in msg, msg
    assert "divisible" not in msg and "multiple" not in msg  # nothing is divided by a size below one


def test_a_window_or_hedgehog_the_linear_form_cannot_take_is_refused_by_name():
    msg = _model_problems(window=4, linear_variant="gated_deltanet", feature_map="identity", qk_norm=True)
    for part in [
        "model.window (4) needs model.linear_variant basic, lightning, retention, simple_gla",
        "needs a non-negative feature map (hedgehog, elu1, relu), got model.feature_map identity",
        "model.qk_norm (per-head q/k RMSNorm) is not applied by the delta-rule layers",
    ]:
        assert part in msg, msg
    msg = _model_problems(window=-1, feature_map="hedgehog", linear_variant="gla", gate_source="value")
    for part in [
        "model.window must be >= 0 (0: no window), got -1",
        "model.gate_source must be projection or key",
        "model.feature_map hedgehog doubles the key dim, which model.linear_variant gla",
    ]:
        assert part in msg, msg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_variant_table_is_what_the_model_builds(name):
    """Each row of lasp.model.variants: the mixer, its decay or gate, what the config lets it take, and
    the parameter count (the FLOPs formula's projections and extras) all follow the table."""
    v = VARIANTS[name]
    cfg = ModelConfig(linear_variant=name, layer_pattern="LS", num_layers=2)
    mixer = LinearLlama(cfg).layers[0].mixer
    assert isinstance(mixer, DeltaNetAttention) == v.delta
    if not v.delta:
        assert (mixer.log_decay is not None) == (v.decay == "constant")
        assert isinstance(mixer.gate, LogGate) == (v.decay == "gate")
        assert mixer.gate is None or mixer.gate.vector == (v.gate == "vector")
    else:
        assert (mixer.a_proj is not None) == (v.gate != "none")
        assert mixer.a_proj is None or mixer.a_proj.out_features == cfg.num_heads * (
            cfg.head_dim if v.gate == "vector" else 1
        )
    assert param_counts(cfg)["total"] == sum(t.numel() for t in LinearLlama(cfg).parameters())
    for fmap in FEATURE_MAPS:
        refused = "does not take" in " ".join(
            ModelConfig(linear_variant=name, feature_map=fmap, layer_pattern="L").problems()
            if fmap in v.feature_maps
            else [_model_problems(linear_variant=name, feature_map=fmap, layer_pattern="L")]
        )
        assert refused == (fmap not in v.feature_maps), fmap
    windowed = dict(linear_variant=name, window=4, feature_map="relu", layer_pattern="L")
    if v.window:
        assert ModelConfig(**windowed).window == 4
    else:
        assert "model.window (4) needs model.linear_variant" in _model_problems(**windowed)


@pytest.mark.parametrize("name", ["norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [0.0, -1e-6])
def test_norm_eps_and_rope_theta_must_be_positive(name, value):
    assert f"model.{name} must be > 0, got {value}" in _model_problems(**{name: value})


def test_an_odd_head_dim_is_refused_only_with_softmax_layers():
    odd = dict(hidden_size=12, num_heads=4, num_kv_heads=2)  # head dim 3
    msg = _model_problems(**odd, layer_pattern="LLLS")
    assert "head dim 3 must be even for RoPE" in msg and "'LLLS'" in msg, msg
    cfg = ModelConfig(**odd, layer_pattern="L")  # no softmax layer, no RoPE
    logits = LinearLlama(cfg)(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert logits.shape == (1, 8, cfg.vocab_size) and torch.isfinite(logits).all()


def test_decays_are_the_published_values():
    """lightning: ALiBi's slopes (Press et al.: 2^(-8/H), its powers, for H a power of two), scaled by
    TransNormerLLM's depth factor 1 - l / (L - 1) (+1e-5); retention: RetNet's gamma_h = 1 - 2^(-5-h)."""
    assert log_decay("basic", 4, layer=1, num_layers=4) is None
    for H, slopes in ((4, [2**-2, 2**-4, 2**-6, 2**-8]), (8, [2.0 ** -(i + 1) for i in range(8)])):
        for layer, depth in ((0, 1 + 1e-5), (1, 2 / 3 + 1e-5), (3, 1e-5)):
            want = -torch.tensor(slopes, dtype=torch.float64) * depth
            torch.testing.assert_close(log_decay("lightning", H, layer=layer, num_layers=4), want, rtol=1e-12, atol=0)
    gamma = torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=torch.float64)
    torch.testing.assert_close(log_decay("retention", 4, layer=1, num_layers=4).exp(), gamma, rtol=1e-12, atol=0)


@pytest.mark.parametrize("feature_map", ["identity", "elu1", "relu", "silu"])
@pytest.mark.parametrize("tie", [False, True])
def test_forward_is_causal_and_mixers_follow_the_pattern(feature_map, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=5, layer_pattern="LS", feature_map=feature_map, tie_embeddings=tie)
    model = LinearLlama(cfg).double()
    kinds = [type(b.mixer) for b in model.layers]
    assert kinds == [LinearAttention, SoftmaxAttention, LinearAttention, SoftmaxAttention, LinearAttention]
    assert (model.lm_head.weight is model.embed.weight) == tie
    tokens = torch.randint(0, cfg.vocab_size, (2, 21))
    logits = model(tokens)
    assert logits.shape == (2, 21, cfg.vocab_size)
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % cfg.vocab_size
    other = model(changed)
    torch.testing.assert_close(other[:, :15], logits[:, :15], atol=1e-12, rtol=0)
    assert (other[:, 15:] - logits[:, 15:]).abs().max() > 1e-6
    loss = lm_loss_sum(logits[:, :-1], tokens[:, 1:]) / tokens[:, 1:].numel()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("variant,pattern", [("lightning", "L"), ("simple_gla", "LLLS"), ("gla", "LS")])
def test_packed_documents_give_each_document_alone(variant, pattern):
    """With `documents` every layer resets at a start (linear state, softmax attention, RoPE positions), so a
    packed row is exactly its documents run one at a time; a document start changes nothing before it."""
    from lasp.kernels.documents import as_documents

    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=len(pattern),
        layer_pattern=pattern,
        linear_variant=variant,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        vocab_size=50,
    )
    model = LinearLlama(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    starts = [[0, 1, 9, 10], [0, 13]]
    logits = model(tokens, documents=as_documents(starts, 2, 19))
    for b, row in enumerate(starts):
        bounds = row + [19]
        alone = torch.cat([model(tokens[b : b + 1, s:e]) for s, e in zip(bounds, bounds[1:])], dim=1)
        torch.testing.assert_close(logits[b : b + 1], alone, atol=1e-12, rtol=0)


def _reference_logits(model: LinearLlama, tokens: torch.Tensor) -> torch.Tensor:
    """A LinearLlama with simple_gla linear layers, written out from its parameters without its modules or
    kernels: the token recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T for a linear layer, a causal softmax
    over rotate-half RoPE'd q and k for a softmax layer (float64; the gate's logsigmoid in float32, as the
    model takes it)."""
    cfg, P = model.cfg, dict(model.named_parameters())
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T = tokens.shape

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def heads(x, n):
        return x.view(B, T, n, D).repeat_interleave(H // n, dim=2)

    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rot(x):
        return x * cos + torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1) * sin

    x = P["embed.weight"][tokens]
    for i in range(cfg.num_layers):
        p = lambda name: P[f"layers.{i}.{name}"]  # noqa: E731
        h = norm(x, p("attn_norm.weight"))
        q, k, v = h @ p("mixer.q_proj.weight").T, h @ p("mixer.k_proj.weight").T, h @ p("mixer.v_proj.weight").T
        q, k, v = heads(q, H), heads(k, Hkv), heads(v, Hkv)
        if cfg.mixer(i) == "L":
            g = (
                torch.nn.functional.logsigmoid((h @ p("mixer.gate.proj.weight").T).float()) / cfg.gate_normalizer
            ).double()
            S, outs = torch.zeros(B, H, D, D, dtype=torch.float64), []
            for t in range(T):
                S = g[:, t, :, None, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
                outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * D**-0.5)
            o = norm(torch.stack(outs, 1), p("mixer.out_norm.weight"))
        else:
            s = torch.einsum("bthd,bshd->bhts", rot(q), rot(k)) * D**-0.5
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
        x = x + o.flatten(2) @ p("mixer.o_proj.weight").T
        h = norm(x, p("mlp_norm.weight"))
        gate, up = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ p("mlp.down_proj.weight").T
    return norm(x, P["norm.weight"]) @ P["lm_head.weight"].T


@pytest.mark.parametrize("pattern", ["L", "S", "LS", "SL", "LLLS"])
def test_a_hybrid_equals_an_independent_reference(pattern):
    """How a hybrid's layers combine (docs/evaluation.md, the retrieval benchmark): the model's logits and
    every parameter's gradient equal a reference written out from the same parameters, for one linear layer,
    one softmax layer, both orders, and the 3:1 hybrid the benchmark trained."""
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
        num_layers=len(pattern), layer_pattern=pattern, linear_variant="simple_gla",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LinearLlama(cfg).double()
    with torch.no_grad():  # weights large enough that every layer moves the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    tokens = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    got, want = model(tokens), _reference_logits(model, tokens)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(want)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b, (name, _) in zip(
        torch.autograd.grad((got * weights).sum(), params),
        torch.autograd.grad((want * weights).sum(), params),
        model.named_parameters(),
    ):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=lambda m: f"d{name}: {m}")
