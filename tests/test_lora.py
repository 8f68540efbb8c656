"""LoRA adapters (lasp.model.lora): an adapted model starts at its base, the adapter's output is
W x + (alpha / r) B A x, merging gives the same function without adapters; and a LoRA run from imported
Hugging Face weights exports merged weights whose transformers logits are the adapted model's. (Adapters
under TP and SP: test_parallel.py; resharded from a checkpoint: test_checkpoint.py.)"""

import pytest
import torch

from lasp.model import LinearLlama, ModelConfig, from_hf
from lasp.model.lora import LoRALinear, merge_lora
from tests.test_hf import SHAPE, _trainer_cfg, hf_dir_and_data, transformers  # noqa: F401 - a fixture

TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj"


def _adapted(seed: int = 0) -> LinearLlama:
    cfg = ModelConfig(num_layers=2, layer_pattern="LS", lora_rank=3, lora_alpha=6.0, lora_targets=TARGETS)
    torch.manual_seed(seed)
    return LinearLlama(cfg).double()


def test_an_adapted_model_starts_at_its_base_and_adds_scaled_b_a():
    adapted = _adapted()
    torch.manual_seed(0)
    base = LinearLlama(ModelConfig(num_layers=2, layer_pattern="LS")).double()
    lora = {n: m for n, m in adapted.named_modules() if isinstance(m, LoRALinear)}
    assert len(lora) == 2 * 5 and all(n.rsplit(".", 1)[1] in TARGETS.split(",") for n in lora)
    tokens = torch.randint(0, 256, (2, 11))
    torch.testing.assert_close(adapted(tokens), base(tokens), rtol=0, atol=0)  # B = 0, the base drawn first
    m = lora["layers.0.mixer.q_proj"]
    with torch.no_grad():
        m.lora_B.normal_(0, 0.3)
    x = torch.randn(4, m.in_features, dtype=torch.float64)
    want = x @ m.weight.T + (6.0 / 3) * (x @ m.lora_A.T) @ m.lora_B.T
    torch.testing.assert_close(m(x), want)
    m.enabled = False  # the teacher's view: the base layer alone
    torch.testing.assert_close(m(x), x @ m.weight.T)


def test_merging_gives_the_same_function_without_adapters():
    adapted = _adapted(seed=1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(".lora_B"):
                p.normal_(0, 0.1)
    merged = merge_lora(adapted)
    assert type(merged) is type(adapted) and merged.cfg.lora_rank == 0
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.embed.weight.dtype == torch.float64
    tokens = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted(tokens), rtol=1e-12, atol=1e-12)


def test_a_lora_run_exports_merged_and_transformers_gives_the_adapted_logits(hf_dir_and_data, tmp_path, capsys):  # noqa: F811
    """train.trainable = lora from imported weights: only the adapters move; the export merges them, and
    transformers' logits of the merged export equal the adapted model's."""
    import yaml

    from lasp.export import main as export
    from lasp.train.__main__ import main
    from lasp.train.artifacts import checkpoint_model

    src, data = hf_dir_and_data
    cfg = _trainer_cfg(
        src,
        data,
        tmp_path / "run",
        layer_pattern="S",
        lora_rank=4,
        lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    )
    cfg["train"].update(trainable="lora", steps=2)
    cfg["optim"] = {"lr": 0.01}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "c.yaml")]) == 0
    assert "adapter parameters train" in capsys.readouterr().out
    step = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert export(["--checkpoint", step, "--out", str(tmp_path / "hf_out"), "--hf"]) == 0
    assert "merged the LoRA adapters (rank 4)" in capsys.readouterr().out
    adapted, _ = checkpoint_model(step, dtype=torch.float64)
    from lasp.model.hf import HFImportError, to_hf

    with pytest.raises(HFImportError, match="LoRA adapters .model.lora_rank 4.: merge them"):
        to_hf(adapted, str(tmp_path / "unmerged"))  # never the base weights without their adapters
    base = from_hf(str(src), dtype=torch.float64)
    for name, p in adapted.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):  # frozen: bit-identical to the import (trained in float32)
            assert torch.equal(p, base.state_dict()[name].float().double()), name
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"), dtype=torch.float64).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = adapted(tokens), back(tokens).logits
        assert (want - base(tokens)).abs().max() > 1e-4  # the adapters moved
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32 weights in the export
