"""Importing Hugging Face Llama-family directories: tiny random models built with transformers here, saved
with save_pretrained, imported with lasp.model.from_hf; float64 logits equal transformers' own forward.
(Under TP, SP and PP the same model features are checked in test_parallel.py; a LoRA run from imported
weights, exported merged: test_lora.py.)"""

import dataclasses
import json

import pytest
import torch

from lasp.model import LinearLlama, from_hf
from lasp.model.hf import HFImportError

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
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
    ours = from_hf(str(tmp_path), dtype=torch.float64)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-9, rtol=1e-9)


def test_sharded_weights_and_a_linearised_pattern(tmp_path):
    """Shards through model.safetensors.index.json; layer_pattern makes layer 0 linear over the imported
    projections (its q, k, v, o are the softmax layer's), the rest stays exact."""
    hf = _save(tmp_path, "LlamaConfig", "LlamaForCausalLM", {}, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = from_hf(str(tmp_path), dtype=torch.float64, layer_pattern="LS", linear_variant="basic")
    assert ours.cfg.mixer(0) == "L" and ours.cfg.mixer(1) == "S"
    sd = hf.state_dict()
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(ours.layers[0].mixer, p).weight, sd[f"model.layers.0.self_attn.{p}.weight"])
    assert torch.isfinite(ours(torch.zeros(1, 8, dtype=torch.long))).all()


def test_what_cannot_be_honoured_is_refused_by_name(tmp_path):
    _save(tmp_path, "LlamaConfig", "LlamaForCausalLM", {})
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(
        hidden_act="gelu",
        mlp_bias=True,
        attention_bias=True,
        some_new_field=3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError) as e:
        from_hf(str(tmp_path))
    msg = str(e.value)
    for part in (
        "5 problem(s)",
        "hidden_act = 'gelu'",
        "mlp_bias = True",
        "attention_bias = True",
        "some_new_field = 3",
        "rope_type = 'yarn'",
    ):
        assert part in msg, part
    mistral = tmp_path / "mistral"
    _save(mistral, "MistralConfig", "MistralForCausalLM", dict(sliding_window=16))
    with pytest.raises(HFImportError, match="sliding_window = 16"):
        from_hf(str(mistral))


def test_missing_and_extra_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(tmp_path, "LlamaConfig", "LlamaForCausalLM", {})
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(HFImportError) as e:
        from_hf(str(tmp_path))
    assert "model.layers.1.mlp.up_proj.weight is missing" in str(e.value)
    assert "model.layers.1.self_attn.extra.weight: a tensor LASP has no place for" in str(e.value)
    with pytest.raises(HFImportError, match="does not exist"):
        from_hf(str(tmp_path / "nowhere"))


# the linearisation recipe's fields (docs/pretrained.md) on a model of TINY's size, the window cut to fit
RECIPE = dict(
    layer_pattern="LS",
    linear_variant="simple_gla",
    gate_source="key",
    feature_map="hedgehog",
    linear_rope=True,
    window=4,
    gate_normalizer=256.0,
)


def _layer0_error(model, tokens) -> float:
    """Layer 0's output before o_proj against the softmax attention of its own q, k, v (the layer it
    replaces) on the same input: the squared error over the teacher's squared norm."""
    mixer, B, T = model.layers[0].mixer, *tokens.shape
    x, positions = model.layers[0].attn_norm(model.embed(tokens)), torch.arange(T).expand(B, T)
    want, got = mixer.teacher(x, positions), mixer.attend(x, positions)
    return float((got - want).pow(2).sum() / want.pow(2).sum())


@pytest.mark.parametrize("case", [CASES["llama3.1-rope-gqa"], CASES["qwen3-qk-norm"]], ids=["llama", "qwen3"])
def test_a_linearised_layer_starts_close_to_the_softmax_layer_it_replaces(tmp_path, case):
    """With the recipe's fields (a window among them) and from_hf's output_norm (off with a window), a
    linearised layer's output is close to its softmax layer's (a squared error below the softmax output's
    own), and the logits within a small KL of the teacher's. A fresh output norm on it (what train.init_from
    would build) is a hundred times further off: refused, by from_hf and (test below) by the trainer. Qwen3's
    q/k norms are imported into the linear layer too: it normalises q and k as the softmax layer did."""
    from lasp.model.hf import initial_state

    sd = _save(tmp_path, *case).state_dict()
    teacher = from_hf(str(tmp_path), dtype=torch.float64)
    hybrid = from_hf(str(tmp_path), dtype=torch.float64, **RECIPE)
    assert not hybrid.cfg.output_norm and hybrid.cfg.mixer(0) == "L"
    for name in ("q_norm", "k_norm") if hybrid.cfg.qk_norm else ():
        assert torch.equal(getattr(hybrid.layers[0].mixer, name).weight, sd[f"model.layers.0.self_attn.{name}.weight"])
    normed = LinearLlama(dataclasses.replace(hybrid.cfg, output_norm=True)).double().eval()
    normed.load_state_dict(initial_state(str(tmp_path), normed.cfg), strict=False)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(tokens).log_softmax(-1)
        kl = [float((want.exp() * (want - m(tokens).log_softmax(-1))).sum(-1).mean()) for m in (hybrid, normed)]
        error = [_layer0_error(m, tokens) for m in (hybrid, normed)]
    # measured: error 0.22 (Llama) and 0.72 (Qwen3) against 140 and 245; KL 1.0e-3 and 3.7e-3 against 2.8e-2
    # and 2.5e-2
    assert error[0] < 1 and kl[0] < 1e-2, (error, kl)
    assert error[1] > 20 and kl[1] > 1.5e-2, (error, kl)
    with pytest.raises(HFImportError) as e:
        from_hf(str(tmp_path), **{**RECIPE, "output_norm": True})
    for part in (
        "model.output_norm = True with model.window = 4 on 1 layer(s) linearised from the weights' softmax layers (0)",
        "set output_norm to false",
    ):
        assert part in str(e.value), str(e.value)
    # without a window the linear branch has no normaliser but the norm: from_hf keeps it on
    assert from_hf(str(tmp_path), **{**RECIPE, "window": 0}).cfg.output_norm


# -- train.init_from ----------------------------------------------------------------------------------------

SHAPE = {
    "vocab_size": 320,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 64,
    "layer_pattern": "LS",
    "linear_variant": "basic",
    "rope_theta": 10000.0,
    "norm_eps": 1e-6,
    "tie_embeddings": False,
}


def _trainer_cfg(src, data, run_dir, parallel=None, **model):
    return {
        "model": {**SHAPE, **model},
        "parallel": parallel or {},
        "data": {"path": data, "seq_len": 32, "global_batch": 2},
        "train": {"steps": 1, "eval_interval": 0, "init_from": str(src)},
        "logging": {"run_dir": str(run_dir), "progress": False, "tensorboard": False, "plot": False},
    }


@pytest.fixture(scope="module")
def hf_dir_and_data(tmp_path_factory):
    from lasp.data import prepare

    root = tmp_path_factory.mktemp("init")
    _save(root / "hf", "LlamaConfig", "LlamaForCausalLM", dict(vocab_size=320))
    (root / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    prepare([str(root / "doc.txt")], str(root / "data"), progress=False)
    return root / "hf", str(root / "data")


def case_init_from(cfg: dict, src: str) -> bool:
    """Under cfg's layout, every rank's shard of every imported tensor is the source's shard."""
    import torch.distributed as dist

    from lasp.kernels import get_kernel
    from lasp.model.hf import initial_state
    from lasp.parallel import init_groups
    from lasp.train.config import resolve
    from lasp.train.loop import build_stage

    c = resolve(cfg, "test", dist.get_world_size())
    groups = init_groups(c.parallel)
    stage, _, _ = build_stage(c, groups, torch.device("cpu"), get_kernel("torch"), init_from=src)
    want = initial_state(src, c.model)
    checked = 0
    for p in stage.parameters():
        w = want.get(p.full_name)
        if w is None:
            continue
        if getattr(p, "tp_dim", None) is not None:
            w = w.chunk(c.parallel.tp, dim=p.tp_dim)[groups.tp_rank]
        assert torch.equal(p.detach(), w.to(p.dtype)), p.full_name
        checked += 1
    return checked


def test_init_from_loads_the_weights_under_tp_and_linearises(dist_pool, hf_dir_and_data, tmp_path):
    src, data = hf_dir_and_data
    cfg = _trainer_cfg(src, data, tmp_path / "run", parallel={"tp": 2})
    checked = dist_pool(2).run("tests.test_hf:case_init_from", cfg=cfg, src=str(src))
    assert checked[0] == checked[1] > 10  # the linear layer 0 took layer 0's q, k, v, o too


def test_init_from_transfers_resumes_and_a_shape_mismatch_is_a_config_error(hf_dir_and_data, tmp_path, capsys):
    import yaml

    from lasp.train.__main__ import main

    src, data = hf_dir_and_data
    path = tmp_path / "c.yaml"
    cfg = _trainer_cfg(src, data, tmp_path / "run", feature_map="hedgehog", window=2, output_norm=False)
    cfg["train"].update(trainable="new", objective="attention_transfer")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {src}: " in out and "new (initialised fresh)" in out
    assert "the loss is the squared error of 1 linear layer(s)" in out
    # frozen tensors have no optimizer state: the checkpoint holds their weights only, and resumes
    assert main(["--config", str(path), "--set", "train.steps=2"]) == 0
    assert "resuming from" in capsys.readouterr().out
    path.write_text(
        yaml.safe_dump(
            _trainer_cfg(src, data, tmp_path / "run2", hidden_size=64, num_heads=8, feature_map="hedgehog", window=2)
        )
    )
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.init_from: model.hidden_size = 64, but the weights have 32" in err
    assert "train.init_from: model.num_heads = 8, but the weights have 4" in err
    assert (
        "train.init_from: model.output_norm = True with model.window = 2 on 1 layer(s) linearised from the "
        "weights' softmax layers (0)"
    ) in err


def _drop(directory, file: str, tensor: str, from_index: bool = False) -> None:
    """Rewrite `file` without `tensor` (and the index without it too, with `from_index`)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / file)
    weights.pop(tensor)
    save_file(weights, directory / file, metadata={"format": "pt"})
    if from_index:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        index["weight_map"].pop(tensor)
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_of(directory, tensor: str) -> str:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][tensor]


UP = "model.layers.1.mlp.up_proj.weight"
BROKEN = {  # name: (how the sharded directory is broken, what the error says)
    "config-not-json": (
        lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],'),
        "config.json is not readable JSON: Expecting property name",
    ),
    "index-not-json": (
        lambda d: (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe"),
        "model.safetensors.index.json is not readable JSON",
    ),
    "shard-missing": (
        lambda d: (d / _shard_of(d, UP)).unlink(),
        "model-00003-of-00004.safetensors: named in model.safetensors.index.json for 5 tensor(s), but absent",
    ),
    "shard-truncated": (
        lambda d: (d / _shard_of(d, UP)).write_bytes((d / _shard_of(d, UP)).read_bytes()[:-100]),
        "model-00003-of-00004.safetensors: not a readable safetensors file (truncated or damaged?)",
    ),
    "tensor-not-in-its-shard": (
        lambda d: _drop(d, _shard_of(d, UP), UP),
        f"model-00003-of-00004.safetensors: model.safetensors.index.json maps {UP} to it, but it holds no such tensor",
    ),
    "tensor-nowhere": (
        lambda d: _drop(d, _shard_of(d, UP), UP, from_index=True),
        f"{UP} is missing from the files model.safetensors.index.json lists (for layers.1.mlp.up_proj.weight)",
    ),
}


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A Llama of SHAPE (the trainer tests' model) in 4 shards through model.safetensors.index.json."""
    root = tmp_path_factory.mktemp("sharded")
    _save(root, "LlamaConfig", "LlamaForCausalLM", dict(vocab_size=320), max_shard_size="100KB")
    assert _shard_of(root, UP) == "model-00003-of-00004.safetensors"
    return root


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_directory_is_an_error_naming_the_file(sharded_dir, hf_dir_and_data, tmp_path, case, capsys):
    """from_hf: an HFImportError naming the file and what is wrong; the trainer (train.init_from): exit 2
    with that message, before anything starts."""
    import shutil

    import yaml

    from lasp.train.__main__ import main

    breaks, message = case
    src = tmp_path / "hf"
    shutil.copytree(sharded_dir, src)
    model = from_hf(str(src))  # whole, it imports
    breaks(src)
    with pytest.raises(HFImportError) as e:
        from_hf(str(src))
    assert message in str(e.value) and str(e.value).count("\n") == 1, str(e.value)
    from lasp.train.config import ConfigError
    from lasp.train.loop import _initialise

    if "is missing from the files" not in message:  # a file that breaks after the config check: a message too
        with pytest.raises(ConfigError) as e:  # (a tensor absent from every file is the config check's alone)
            _initialise(model, str(src))
        assert message in str(e.value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_trainer_cfg(src, hf_dir_and_data[1], tmp_path / "run")))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"train.init_from: cannot import {src}" in err and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_an_all_softmax_export_loads_in_transformers_with_equal_logits(tmp_path, case):
    """transformers -> from_hf -> to_hf -> transformers: the same architecture and the same logits."""
    from lasp.model.hf import to_hf

    hf = _save(tmp_path / "src", *case)
    ours = from_hf(str(tmp_path / "src"), dtype=torch.float64)
    to_hf(ours, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float64).eval()
    assert type(back).__name__ == {"MistralForCausalLM": "LlamaForCausalLM"}.get(case[1], case[1])  # no window left
    tokens = torch.randint(0, TINY["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, atol=1e-9, rtol=1e-9)


def test_prepare_takes_the_model_directorys_tokenizer(tmp_path):
    """--tokenizer DIR reads DIR/tokenizer.json (a Hugging Face model directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lasp.data import prepare

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "model").mkdir()
    tok.save(str(tmp_path / "model" / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("a b a")
    meta = prepare(str(tmp_path / "doc.txt"), tmp_path / "out", tokenizer=str(tmp_path / "model"), progress=False)
    assert meta["tokenizer"]["name"] == "tokenizer.json" and meta["tokenizer"]["eos_id"] == 3


def case_trainable_new(cfg: dict, src: str) -> dict:
    """One step with train.trainable = new or lora under cfg's layout: the frozen tensors are bit-identical
    after it and have no optimizer state; the others moved. With attention transfer or distillation, the
    loss equals one process's, computed here without the trainer's code."""
    import torch.distributed as dist

    from lasp.kernels import get_kernel
    from lasp.model.hf import initial_state, provided
    from lasp.parallel import init_groups, train_step
    from lasp.train.config import resolve
    from lasp.train.loop import build_stage

    c = resolve(cfg, "test", dist.get_world_size())
    groups = init_groups(c.parallel)
    stage, optimizer, _ = build_stage(c, groups, torch.device("cpu"), get_kernel("torch"), init_from=src)
    torch.manual_seed(c.train.seed)  # one process, the new tensors drawn as build_stage draws them
    one = LinearLlama(c.model)
    one.load_state_dict(initial_state(src, c.model), strict=False)
    if c.train.trainable == "lora":
        frozen = {n for n, _ in one.named_parameters() if not n.endswith((".lora_A", ".lora_B"))}
        # B starts at zero, where A gets no gradient: draw it, the same on every rank (its shard under TP)
        gen = torch.Generator().manual_seed(5)
        drawn = {
            n: torch.randn(p.shape, generator=gen) * 0.05 for n, p in one.named_parameters() if n.endswith(".lora_B")
        }
        with torch.no_grad():
            for n, p in one.named_parameters():
                if n in drawn:
                    p.copy_(drawn[n])
            for p in stage.parameters():
                if p.full_name in drawn:
                    w, dim = drawn[p.full_name], getattr(p, "tp_dim", None)
                    p.copy_(w if dim is None else w.chunk(c.parallel.tp, dim=dim)[groups.tp_rank])
    else:
        frozen = provided(src, c.model)
    before = {p.full_name: p.detach().clone() for p in stage.parameters()}
    tokens = torch.randint(0, c.model.vocab_size, (2, c.data.seq_len + 1), generator=torch.Generator().manual_seed(3))
    loss = float(train_step(stage, tokens, c.parallel, groups))
    want = None
    if c.train.objective == "attention_transfer":
        from lasp.parallel import attention_transfer
        from lasp.parallel.loss import transfer_loss_sum

        mixers = attention_transfer(one)
        one(tokens[:, :-1])
        want = float(transfer_loss_sum(mixers).detach()) / tokens[:, 1:].numel()
    elif c.train.distill_weight:
        from lasp.model.llama import softmax_teacher

        with torch.no_grad(), softmax_teacher(one):
            teacher = one(tokens[:, :-1])
        logits = one(tokens[:, :-1]).detach()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum"
        )
        assert kl > 1e-3  # the linear layers and the adapters differ from the teacher
        want = float(ce + c.train.distill_weight * kl) / tokens[:, 1:].numel()
    if want is not None:  # float32: the trainer's
        assert want > 0 and abs(loss - want) <= 1e-5 * want, (loss, want)
    optimizer.step()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    moved, kept = 0, 0
    for p in stage.parameters():
        if p.full_name in frozen:
            assert torch.equal(p.detach(), before[p.full_name]), p.full_name
            assert id(p) not in in_optimizer and p not in optimizer.state and p.grad is None, p.full_name
            kept += 1
        else:
            assert id(p) in in_optimizer and not torch.equal(p.detach(), before[p.full_name]), p.full_name
            moved += 1
    return {"kept": kept, "moved": moved}


TRAINABLE = {  # the layout, the model and the objective of a run whose imported tensors stay frozen
    "lm-gdn-sp2": ({"sp": 2}, dict(linear_variant="gated_deltanet"), "lm"),
    "transfer-window-tp2-sp2": (
        {"tp": 2, "sp": 2},
        dict(
            linear_variant="simple_gla",
            gate_source="key",
            feature_map="hedgehog",
            window=4,
            linear_rope=True,
            output_norm=False,
        ),
        "attention_transfer",
    ),
    "transfer-gdn-sp2": (
        {"sp": 2, "sp_layout": "contiguous"},
        dict(linear_variant="gated_deltanet"),
        "attention_transfer",
    ),
    # stage 2: LoRA adapters and KL distillation to the original softmax model, at TP = 2 x SP = 2
    "lora-distill-window-tp2-sp2": (
        {"tp": 2, "sp": 2},
        dict(
            linear_variant="simple_gla",
            gate_source="key",
            feature_map="hedgehog",
            window=4,
            linear_rope=True,
            output_norm=False,
            lora_rank=4,
            lora_targets="q_proj,v_proj,o_proj,down_proj",
        ),
        "distill",
    ),
}


@pytest.mark.parametrize("case", TRAINABLE.values(), ids=TRAINABLE.keys())
def test_only_the_new_parameters_train(dist_pool, hf_dir_and_data, tmp_path, case):
    layout, model, objective = case
    src, data = hf_dir_and_data
    cfg = _trainer_cfg(src, data, tmp_path / "run", parallel=layout, **model)
    if objective == "distill":
        cfg["train"].update(trainable="lora", distill_weight=0.5)
    else:
        cfg["train"].update(trainable="new", objective=objective)
    world = layout.get("tp", 1) * layout.get("sp", 1)
    for r in dist_pool(world).run("tests.test_hf:case_trainable_new", cfg=cfg, src=str(src)):
        # layer 0's new tensors: the delta rule's convolutions, beta, gate, A_log, dt_bias, ...; Hedgehog's
        # maps and the window's share; LoRA: A and B of 4 projections in 2 layers
        least = {"distill": 16, "lm": 8}.get(objective, 8 if "deltanet" in model["linear_variant"] else 3)
        assert r["kept"] > 10 and r["moved"] >= least, r


@pytest.mark.parametrize(
    "qk_norm, pattern, family",
    [(False, "M", "MixtralForCausalLM"), (True, "DM", "Qwen3MoeForCausalLM")],
    ids=["mixtral", "qwen3-moe"],
)
def test_a_moe_export_loads_in_transformers_per_expert_with_equal_logits(tmp_path, qk_norm, pattern, family):
    """Experts one tensor each under Mixtral's (w1, w3, w2) or Qwen3-MoE's names (dense layers as
    mlp_only_layers); transformers gives the same logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lasp.model import LinearLlama, ModelConfig
    from lasp.model.hf import HFImportError, to_hf

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        layer_pattern="S",
        qk_norm=qk_norm,
        float32_norm_rope=True,
        moe=dict(num_experts=4, top_k=2, ffn_hidden_size=16, pattern=pattern),
    )
    ours = LinearLlama(cfg).eval()
    to_hf(ours, str(tmp_path / "out"))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        expert = "block_sparse_moe.experts.3.w2" if not qk_norm else "mlp.experts.3.down_proj"
        assert f"model.layers.1.{expert}.weight" in set(f.keys())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf).__name__ == family
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-6)
    shared = LinearLlama(
        ModelConfig(
            **{
                **cfg.__dict__,
                "qk_norm": False,
                "moe": dict(num_experts=4, ffn_hidden_size=16, shared_ffn_hidden_size=8, router="sigmoid", top_k=1),
            }
        )
    )
    with pytest.raises(HFImportError) as e:
        to_hf(shared, str(tmp_path / "refused"))
    for part in ("model.moe.router = 'sigmoid'", "model.moe.shared_ffn_hidden_size = 8", "model.moe.top_k = 1"):
        assert part in str(e.value), str(e.value)
