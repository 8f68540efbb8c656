"""Decoding with a fixed-size state per linear layer, sampling, save/load of exported models, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lasp import generate as cli
from lasp.data.tokenizer import ByteTokenizer, load_tokenizer
from lasp.model import (
    DecodeState,
    LinearLlama,
    ModelConfig,
    PretrainedError,
    decode_memory,
    decode_step,
    from_pretrained,
    generate,
    sample,
    save_pretrained,
)
from lasp.train import artifacts
from tests.refusals import refuse_all

BYTE_TOK = ByteTokenizer().describe()


def tiny(seed: int = 0, dtype=torch.float64, **kw) -> LinearLlama:
    """A small model with weights large enough that every mixer visibly moves the logits."""
    base = dict(
        vocab_size=300,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=64,
        layer_pattern="L",
        init_std=0.15,
    )
    torch.manual_seed(seed)
    return LinearLlama(ModelConfig(**{**base, **kw})).to(dtype).eval()


CASES = {
    **{
        f"{v}-{f}": dict(linear_variant=v, feature_map=f)
        for v in ("basic", "lightning", "retention")
        for f in ("identity", "elu1")
    },
    "no-out-norm": dict(output_norm=False),
    "no-out-norm-elu1-retention": dict(output_norm=False, feature_map="elu1", linear_variant="retention"),
    "mha": dict(num_kv_heads=4),
    "mqa-silu": dict(num_kv_heads=1, feature_map="silu"),
    "hybrid-LLS": dict(layer_pattern="LLS", feature_map="elu1"),
    "hybrid-LSLS": dict(layer_pattern="LSLS", num_layers=4, linear_variant="retention", tie_embeddings=True),
    "softmax-S": dict(layer_pattern="S", num_layers=2),
    "simple-gla-hybrid": dict(linear_variant="simple_gla", layer_pattern="LLS", feature_map="elu1"),
    "gla": dict(linear_variant="gla", num_kv_heads=1),
    "deltanet-neg-eigval": dict(linear_variant="deltanet", allow_neg_eigval=True),
    "gated-deltanet-hybrid": dict(linear_variant="gated_deltanet", layer_pattern="LLS"),
    "kda-mqa-conv2": dict(linear_variant="kda", num_kv_heads=1, conv_size=2),
    "deltaproduct-3-hybrid": dict(linear_variant="deltaproduct", num_householder=3, layer_pattern="LLS"),
    "mom-gated-deltanet-shared": dict(linear_variant="gated_deltanet", mom_num_memories=3, mom_shared_memory=True),
    "mom-gla-mqa": dict(linear_variant="gla", mom_num_memories=4, mom_top_k=3, num_kv_heads=1),
    # linearised layers: Hedgehog features, Liger's key gate, RoPE'd q and k, a softmax window
    "window-hedgehog-key-gate": dict(
        linear_variant="simple_gla",
        gate_source="key",
        feature_map="hedgehog",
        window=6,
        linear_rope=True,
        output_norm=False,
        layer_pattern="LLS",
    ),
    "window-elu1-qk-norm": dict(linear_variant="lightning", feature_map="elu1", window=1, qk_norm=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decoding_reproduces_the_full_forward(case):
    model = tiny(**case)
    for mixer in (b.mixer for b in model.layers):
        mixer.attn_fn = None  # decoding must not go through the (possibly parallel) attention slot
    B, T = 2, 75  # a prefill longer than one 64-token kernel block, odd lengths
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    ref = tiny(**case)(tokens)
    for splits in ([1] * T, [67] + [1] * 8, [5, 9, 1, 60]):  # token by token; prefill + steps; mixed chunks
        state = DecodeState.empty(model, B)
        out, at = [], 0
        for n in splits:
            out.append(decode_step(model, tokens[:, at : at + n], state))
            at += n
        assert state.position == T
        torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-9, rtol=1e-9)
    state = DecodeState.empty(model, B)
    last = decode_step(model, tokens, state, last_only=True)
    torch.testing.assert_close(last, ref[:, -1:], atol=1e-9, rtol=1e-9)


def test_bfloat16_decoding_follows_the_forward():
    model = tiny(layer_pattern="LLS", dtype=torch.float32).to(torch.bfloat16)
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    state = DecodeState.empty(model, 1)
    out = torch.cat(
        [decode_step(model, tokens[:, :12], state)]
        + [decode_step(model, tokens[:, i : i + 1], state) for i in range(12, 20)],
        dim=1,
    )
    assert out.dtype == torch.bfloat16 and state.layers[0].dtype == torch.float32
    torch.testing.assert_close(out.float(), model(tokens).float(), atol=0.05, rtol=0.05)


def test_linear_state_is_constant_size_and_kv_cache_grows_per_token():
    linear = tiny(dtype=torch.float32)
    state = DecodeState.empty(linear, 1)
    sizes = []
    for n in (1, 1, 30, 1, 100):
        decode_step(linear, torch.zeros(1, n, dtype=torch.long), state)
        sizes.append(state.nbytes())
    mem = decode_memory(linear.cfg, torch.float32)
    assert sizes == [mem.fixed_bytes] * 5 and mem.per_token_bytes == 0
    assert mem.fixed_bytes == 3 * 4 * 8 * 8 * 4  # layers * H * K * V * float32

    hybrid = tiny(layer_pattern="LLS", num_layers=3, dtype=torch.float32)
    state = DecodeState.empty(hybrid, 2, capacity=50)
    decode_step(hybrid, torch.zeros(2, 50, dtype=torch.long), state)
    mem = decode_memory(hybrid.cfg, torch.float32)
    assert mem.per_token_bytes == 2 * 2 * 8 * 4  # K and V * Hkv * D * float32, one softmax layer
    assert state.nbytes() == mem.at(50, batch=2)
    decode_step(hybrid, torch.zeros(2, 1, dtype=torch.long), state)  # past the capacity: the cache grows
    assert state.layers[2].length == 51 and state.nbytes() > mem.at(51, batch=2)
    # the quick-start shape (configs/cpu-quickstart.yaml): 3 linear layers and one softmax layer
    qs = ModelConfig(
        vocab_size=320,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=352,
        layer_pattern="LLLS",
    )
    assert decode_memory(qs, torch.float32) == type(mem)(fixed_bytes=3 * 4 * 32 * 32 * 4, per_token_bytes=512)
    assert decode_memory(qs, torch.bfloat16) == type(mem)(fixed_bytes=3 * 4 * 32 * 32 * 4, per_token_bytes=256)


def _ids(steps) -> list[list[int]]:
    return torch.stack(list(steps), dim=1).tolist()


def test_greedy_is_the_argmax_of_the_forward_and_deterministic():
    model = tiny(layer_pattern="LLS")
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    got = _ids(generate(model, prompt, 12, temperature=0))
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == seq[:, 7:].tolist()
    assert _ids(generate(model, prompt, 12, temperature=0)) == got
    tiny_p = _ids(generate(model, prompt, 12, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(0)))
    assert tiny_p == got  # only the most likely token survives a vanishing nucleus


def test_seeded_sampling_reproduces_and_eos_stops():
    model = tiny(layer_pattern="LS", num_layers=2)
    run = lambda seed, **kw: _ids(
        generate(
            model,
            [5, 6, 7],
            25,
            temperature=1.5,
            top_p=0.9,  # noqa: E731
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )
    )
    assert run(0) == run(0) and run(0) != run(1)
    first = run(0)[0]
    eos = first[3]
    stopped = run(0, eos_id=eos)[0]
    assert stopped == first[: first.index(eos) + 1]  # the same draws up to and including EOS
    # a batch stops when every row has finished; finished rows repeat EOS
    greedy = _ids(generate(model, torch.tensor([[5, 6, 7], [9, 9, 9]]), 10, temperature=0))
    eos = greedy[0][2]
    rows = _ids(generate(model, torch.tensor([[5, 6, 7], [9, 9, 9]]), 10, temperature=0, eos_id=eos))
    assert rows[0][:3] == greedy[0][:3] and all(t == eos for t in rows[0][3:])


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(2000, 3)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 0.5, gen).tolist()) == {1}
    assert set(sample(logits, 1.0, 0.6, gen).tolist()) == {1, 2}
    assert set(sample(logits, 1.0, 1.0, gen).tolist()) == {0, 1, 2}
    assert sample(logits, 0.0, 0.5).eq(1).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.5), r"temperature must be a finite number >= 0 .* got -0.5"),
        (dict(temperature=float("nan")), r"temperature must be a finite number >= 0 .* got nan"),
        (dict(temperature=float("inf")), r"temperature must be a finite number >= 0 .* got inf"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(prompt_ids=[]), r"prompt is empty"),
        (dict(prompt_ids=[1, 300, 2]), r"ids in \[0, 300\) .* max 300"),
        (dict(prompt_ids=[-1, 2]), r"min -1"),
        (dict(max_new_tokens=-1), r"max_new_tokens must be >= 0, got -1"),
        (dict(eos_id=300), r"eos_id must be in \[0, 300\), got 300"),
    ],
)
def test_bad_generation_arguments_are_clear_errors(kw, match):
    model = tiny(dtype=torch.float32)
    args = dict(prompt_ids=[1, 2], max_new_tokens=3) | kw
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)  # raised at the call


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_and_load_round_trip(tmp_path, tie):
    model = tiny(layer_pattern="LLS", tie_embeddings=tie, dtype=torch.float32)
    save_pretrained(model, tmp_path / "m", tokenizer=BYTE_TOK)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert ("lm_head.weight" in stored) != tie and set(stored) <= set(model.state_dict())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "lasp-linear-llama" and config["version"] == 1 and config["tokenizer"] == BYTE_TOK
    assert config["model"]["tie_embeddings"] is tie
    loaded = from_pretrained(tmp_path / "m")
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie and loaded.cfg == model.cfg
    tokens = torch.randint(0, 300, (2, 19))
    assert torch.equal(loaded(tokens), model(tokens))
    assert from_pretrained(tmp_path / "m", dtype=torch.float64).embed.weight.dtype == torch.float64
    half = from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16 and half.layers[0].mixer.log_decay.dtype == torch.float32
    save_pretrained(model, tmp_path / "m")  # overwrites in place; no temporary files left
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def _write_hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(path))
    return path


def test_tokenizer_json_is_copied_and_reloaded(tmp_path):
    pytest.importorskip("tokenizers")
    desc = load_tokenizer(str(_write_hf_tokenizer(tmp_path / "src.json"))).describe()
    save_pretrained(tiny(vocab_size=8, dtype=torch.float32), tmp_path / "m", tokenizer=desc)
    (tmp_path / "src.json").unlink()  # the export must not depend on the training machine's file
    tok = artifacts.load_tokenizer_for(tmp_path / "m")
    assert tok.sha256 == desc["sha256"] and tok.encode("hello world") == [1, 2] and tok.eos_id == 3
    with pytest.raises(PretrainedError, match="tokenizer vocab_size 4 exceeds the model's vocab_size 3"):
        save_pretrained(tiny(vocab_size=3, dtype=torch.float32), tmp_path / "n", tokenizer=desc)


def _corrupt(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))


def test_strict_load_errors_name_the_file_and_the_problem(tmp_path):
    d = tmp_path / "m"
    model = tiny(layer_pattern="LS", num_layers=2, dtype=torch.float32)
    save_pretrained(model, d)
    _corrupt(d, lambda t: t.pop("layers.0.mixer.k_proj.weight"))
    with pytest.raises(PretrainedError, match=r"(?s)model.safetensors: .*missing tensor layers.0.mixer.k_proj.weight"):
        from_pretrained(d)
    save_pretrained(model, d)
    _corrupt(d, lambda t: t.update({"layers.1.mlp.up_proj.weight": torch.zeros(3, 32), "extra.bias": torch.zeros(1)}))
    with pytest.raises(PretrainedError) as e:
        from_pretrained(d)
    assert "unexpected tensor extra.bias" in str(e.value)
    assert "tensor layers.1.mlp.up_proj.weight has shape [3, 32], the config needs [64, 32]" in str(e.value)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["hidden_size"] = 30
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match=r"(?s)config.json: .* does not build: .*hidden_size \(30\)"):
        from_pretrained(d)
    cfg["model"]["hidden_size"], cfg["model"]["n_experts"] = 32, 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match=r"config.json: unknown model config field\(s\) n_experts"):
        from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match=r"config.json"):
        from_pretrained(d)
    save_pretrained(model, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match=r"model.safetensors: missing"):
        from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(PretrainedError, match=r"config.json: missing"):
        from_pretrained(d)


def test_cli_generates_text_from_an_export_and_from_a_trainer_checkpoint(tmp_path, capsys, monkeypatch):
    model = tiny(vocab_size=320, layer_pattern="LLS", tie_embeddings=True, dtype=torch.float32)
    save_pretrained(model, tmp_path / "export", tokenizer=BYTE_TOK)
    argv = ["--prompt", "def f(x):", "--max-new-tokens", "16", "--temperature", "0", "--device", "cpu"]
    assert cli.main(["--checkpoint", str(tmp_path / "export"), *argv]) == 0
    out, err = capsys.readouterr()
    ids = [int(i[0]) for i in generate(model, list(b"def f(x):"), 16, temperature=0, eos_id=256)]
    expected = "def f(x):" + ByteTokenizer().decode(i for i in ids if i != 256) + "\n"
    assert out == expected and "tokens/s" in err and "per token" in err

    def consolidate(checkpoint_dir):  # the contract of lasp.train.artifacts.consolidate
        assert checkpoint_dir == str(tmp_path / "ckpt")
        return model.cfg, {k: v.clone() for k, v in model.state_dict().items()}, BYTE_TOK

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "COMMITTED").write_text("{}")  # what the path check looks for; consolidate is faked
    monkeypatch.setattr(artifacts, "consolidate", consolidate)
    assert cli.main(["--checkpoint", str(tmp_path / "ckpt"), *argv]) == 0
    assert capsys.readouterr().out == expected

    assert cli.main(["--checkpoint", str(tmp_path / "missing"), *argv]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "export" / "model.safetensors").unlink()
    assert cli.main(["--checkpoint", str(tmp_path / "export"), *argv]) == 2
    assert "model.safetensors: missing" in capsys.readouterr().err
    save_pretrained(model, tmp_path / "export", tokenizer=BYTE_TOK)
    assert cli.main(["--checkpoint", str(tmp_path / "export"), "--prompt", "", "--device", "cpu"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_as_a_module(tmp_path):
    save_pretrained(tiny(vocab_size=320, dtype=torch.float32), tmp_path / "m", tokenizer=BYTE_TOK)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasp.generate",
            "--checkpoint",
            str(tmp_path / "m"),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "8",
            "--seed",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and "tokens/s" in r.stderr


def test_cli_refuses_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    assert "is not a checkpoint: it has no COMMITTED marker and no model.safetensors" in capsys.readouterr().err


def test_cli_refuses_more_new_tokens_than_the_memory_holds(tmp_path, capsys):
    """The KV cache is allocated for the prompt and every new token at once: far beyond the memory available,
    the request is refused before, with the estimate, the memory and what to lower."""
    save_pretrained(tiny(vocab_size=320, layer_pattern="LLS", dtype=torch.float32), tmp_path / "m", tokenizer=BYTE_TOK)
    n = 10**15  # x 128 bytes of KV cache per token
    refuse_all(
        cli.main,
        [
            (
                ["--checkpoint", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", str(n), "--device", "cpu"],
                f"--max-new-tokens {n}: needs at least 119,209,289",
                "GiB are available (MemAvailable): lower it or shorten the prompt (2 tokens), or use --dtype bfloat16",
            )
        ],
        capsys,
        watch=[tmp_path],
    )


def test_positions_past_what_float32_rope_angles_tell_apart_are_refused():
    from lasp.model.decode import position_limit

    model = tiny(layer_pattern="LLS", float32_norm_rope=True, dtype=torch.float32)
    assert position_limit(model.cfg) == 2**24
    assert position_limit(tiny(layer_pattern="LLS").cfg) is None  # float64 angles
    assert position_limit(tiny(float32_norm_rope=True).cfg) is None  # no layer rotates
    with pytest.raises(
        ValueError,
        match=r"max_new_tokens \(16,777,216\) need 16,777,217 positions, more than "
        r"the 16,777,216 this model tells apart",
    ):
        generate(model, [1, 2], 2**24)
    state = DecodeState.empty(model, 1)
    state.position = 2**24 - 1
    decode_step(model, torch.tensor([[1]]), state)  # the last position float32 holds apart from the others
    with pytest.raises(ValueError, match="16,777,216 tokens decoded and 1 more need 16,777,217 positions"):
        decode_step(model, torch.tensor([[1]]), state)


def test_available_memory_of_a_gpu_counts_what_torch_holds_unused(monkeypatch):
    from lasp.cli import available_memory

    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GiB)
    assert available_memory("cuda") == (7 * GiB, "free on the GPU")
    have, what = available_memory("cpu")
    assert what == "MemAvailable" and 0 < have <= int(open("/proc/meminfo").read().split()[1]) * 1024  # MemTotal
