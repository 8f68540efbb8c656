"""lasp.train.artifacts: what a path holds (a trainer checkpoint, a LASP export, a Hugging Face directory), and its
model and tokenizer, the one answer lasp.eval, lasp.generate and lasp.export share."""

import json

import pytest
import torch

from lasp.data.tokenizer import ByteTokenizer
from lasp.model import LinearLlama, ModelConfig, save_pretrained
from lasp.train import artifacts


def test_what_a_path_holds_and_its_model(tmp_path):
    cfg = ModelConfig(vocab_size=260, num_layers=2, layer_pattern="LS")
    torch.manual_seed(0)
    model = LinearLlama(cfg)
    save_pretrained(model, tmp_path / "export", tokenizer=ByteTokenizer().describe())
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "COMMITTED").write_text("{}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "other").mkdir()
    (tmp_path / "file").write_text("x")
    kinds = {name: artifacts.kind(tmp_path / name) for name in ("export", "step", "hf", "other", "file", "none")}
    assert kinds == {"export": "export", "step": "checkpoint", "hf": "hf", "other": None, "file": None, "none": None}

    loaded, tok = artifacts.load(tmp_path / "export", dtype=torch.float64)
    assert tok.describe() == ByteTokenizer().describe() and loaded.embed.weight.dtype == torch.float64
    tokens = torch.randint(0, 260, (1, 9))
    torch.testing.assert_close(loaded(tokens), model.double()(tokens))
    assert artifacts.tokenizer_of(str(tmp_path / "export")).describe() == ByteTokenizer().describe()
    assert artifacts.recorded(str(tmp_path / "export")) == (ByteTokenizer().describe(), 260)
    with pytest.raises(artifacts.UsageError, match=f"{tmp_path / 'other'} is neither an export directory"):
        artifacts.load(tmp_path / "other")
    with pytest.raises(artifacts.UsageError, match="is not a directory"):
        artifacts.load(tmp_path / "file")


def test_init_from_takes_a_directory_of_weights_not_a_checkpoint(tmp_path):
    cfg = ModelConfig(vocab_size=260, num_layers=2, layer_pattern="LS")
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "COMMITTED").write_text("{}")
    (p,) = artifacts.init_from_problems(str(tmp_path / "step"), cfg, None)
    assert p.startswith(f"train.init_from: {tmp_path / 'step'} is a trainer checkpoint") and "train.resume" in p
    save_pretrained(LinearLlama(cfg), tmp_path / "export", tokenizer=ByteTokenizer().describe())
    assert artifacts.init_from_problems(str(tmp_path / "export"), cfg, None) == []
    other = ModelConfig(vocab_size=260, num_layers=2, layer_pattern="LS", hidden_size=32)
    assert any("hidden_size" in q for q in artifacts.init_from_problems(str(tmp_path / "export"), other, None))
