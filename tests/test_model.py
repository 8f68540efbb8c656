"""Single-device Linear-Llama: config checks, mixer pattern, decays, causality, tied embeddings."""

import pytest
import torch

from lasp.model import LinearAttention, LinearLlama, ModelConfig, SoftmaxAttention, lm_loss_sum
from lasp.model.layers import log_decay


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as e:
        ModelConfig(hidden_size=66, num_heads=4, num_kv_heads=3, layer_pattern="LXS", feature_map="tanh")
    msg = str(e.value)
    for part in ["hidden_size (66) must be divisible by model.num_heads (4)", "multiple of model.num_kv_heads (3)",
                 "layer_pattern", "feature_map"]:
        assert part in msg


@pytest.mark.parametrize("variant", ["basic", "lightning", "retention"])
def test_decays(variant):
    g = log_decay(variant, 4, layer=1, num_layers=4)
    if variant == "basic":
        assert g is None
    else:
        assert g.shape == (4,) and bool((g < 0).all()) and bool((g > -1).all())


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
