"""Importing Hugging Face Llama-family directories: tiny random models built with transformers here, saved
with save_pretrained, imported with LinearLlama.from_hf; float64 logits equal transformers' own forward.
(Under TP, SP and PP the same model features are checked in test_parallel.py.)"""

import json

import pytest
import torch

from lasp.model import LinearLlama
from lasp.model.hf import HFImportError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {  # name: (config class, model class, config fields)
    "llama3.1-rope-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
}


def _save(tmp_path, config: str, model: str, fields: dict, **save_kw):
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(**{**TINY, **fields})
    hf = getattr(transformers, model)(cfg).double().eval()
    with torch.no_grad():
        for p in hf.parameters():  # visible biases and norms too
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path, **save_kw)
    return hf


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_import_gives_transformers_logits(tmp_path, case):
    hf = _save(tmp_path, *case)
    ours = LinearLlama.from_hf(str(tmp_path), dtype=torch.float64)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-9, rtol=1e-9)


def test_sharded_weights_and_a_linearised_pattern(tmp_path):
    """Shards through model.safetensors.index.json; layer_pattern makes layer 0 linear over the imported
    projections (its q, k, v, o are the softmax layer's), the rest stays exact."""
    hf = _save(tmp_path, "LlamaConfig", "LlamaForCausalLM", {}, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = LinearLlama.from_hf(str(tmp_path), dtype=torch.float64, layer_pattern="LS", linear_variant="basic")
    assert ours.cfg.mixer(0) == "L" and ours.cfg.mixer(1) == "S"
    sd = hf.state_dict()
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(ours.layers[0].mixer, p).weight, sd[f"model.layers.0.self_attn.{p}.weight"])
    assert torch.isfinite(ours(torch.zeros(1, 8, dtype=torch.long))).all()


def test_what_cannot_be_honoured_is_refused_by_name(tmp_path):
    _save(tmp_path, "LlamaConfig", "LlamaForCausalLM", {})
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hidden_act="gelu", mlp_bias=True, attention_bias=True, some_new_field=3,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError) as e:
        LinearLlama.from_hf(str(tmp_path))
    msg = str(e.value)
    for part in ("5 problem(s)", "hidden_act = 'gelu'", "mlp_bias = True", "attention_bias = True",
                 "some_new_field = 3", "rope_type = 'yarn'"):
        assert part in msg, part
    mistral = tmp_path / "mistral"
    _save(mistral, "MistralConfig", "MistralForCausalLM", dict(sliding_window=16))
    with pytest.raises(HFImportError, match="sliding_window = 16"):
        LinearLlama.from_hf(str(mistral))


def test_missing_and_extra_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(tmp_path, "LlamaConfig", "LlamaForCausalLM", {})
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(HFImportError) as e:
        LinearLlama.from_hf(str(tmp_path))
    assert "model.layers.1.mlp.up_proj.weight is missing" in str(e.value)
    assert "model.layers.1.self_attn.extra.weight: a tensor LASP has no place for" in str(e.value)
    with pytest.raises(HFImportError, match="does not exist"):
        LinearLlama.from_hf(str(tmp_path / "nowhere"))
