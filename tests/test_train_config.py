"""The trainer's configuration: strict YAML, every problem at once with its path, --set, dry runs."""

import glob
import os

import pytest
import yaml

from lasp.model import LinearLlama, ModelConfig
from lasp.train.__main__ import main
from lasp.train.config import ConfigError, load_config, resolve
from lasp.train.flops import flops_per_token, hardware_flops_per_token, param_counts
from lasp.train.optim import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _problems(data, world_size=1, check_data=False):
    with pytest.raises(ConfigError) as e:
        resolve(data, "x.yaml", world_size, check_data)
    return e.value.problems


def test_every_problem_at_once_with_its_path():
    problems = _problems({
        "model": {"num_heads": 6, "num_kv_heads": 6, "hidden_size": 96, "hidden_sise": 3},
        "parallel": {"tp": 4, "sp": 2, "dp": 2, "microbatches": 3, "sp_layout": "zigzag"},
        "data": {"seq_len": 102, "global_batch": 8},
        "optim": {"lr": "fast", "beta2": 1.5},
        "train": {"steps": 0, "dtype": "float16", "activation_checkpointing": "some"},
        "trian": {},
    }, world_size=16)
    text = "\n".join(problems)
    for part in [
        "trian: unknown section (did you mean 'train'?)",
        "model.hidden_sise: unknown key (did you mean 'hidden_size'?)",
        "optim.lr: expected float, got str 'fast'",
        "train.dtype: expected one of 'float32', 'bfloat16', got str 'float16'",
        "train.activation_checkpointing: expected one of 'none', 'full' or int, got str 'some'",
        "optim.beta1 and optim.beta2 must be in [0, 1), got 0.9, 1.5",
        "train.steps must be >= 1, got 0",
        "model.num_heads (6) is not divisible by parallel.tp (4)",
        "sequence length 102 is not divisible by the zigzag layout over parallel.sp = 2 ranks",
        "global batch 8 is not divisible by parallel.dp x parallel.microbatches = 2 x 3",
    ]:
        assert part in text, f"{part!r} not in:\n{text}"


def test_world_size_and_the_data_are_checked(tmp_path):
    problems = _problems({"parallel": {"sp": 2}, "data": {"path": str(tmp_path / "nope"), "seq_len": 64}},
                         world_size=1, check_data=True)
    assert any("world size 1 != tp x sp x pp x dp = 1 x 2 x 1 x 1 = 2" in p for p in problems)
    assert any("nope does not exist" in p and "lasp.data prepare" in p for p in problems)


def test_model_problems_come_with_the_rest():
    problems = _problems({"model": {"hidden_size": 65}, "optim": {"lr": -1.0}})
    assert any("model.hidden_size (65) must be divisible by model.num_heads (4)" in p for p in problems)
    assert any("optim.lr must be > 0, got -1.0" in p for p in problems)


def test_overrides_are_yaml_scalars_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"seq_len": 64}}))
    cfg = load_config(str(path), ["optim.lr=1e-4", "train.activation_checkpointing=2", "model.tie_embeddings=true",
                                  "schedule.decay_steps=null"], world_size=1, check_data=False)
    assert cfg.optim.lr == 1e-4 and cfg.train.checkpoint_every == 2 and cfg.model.tie_embeddings
    assert cfg.schedule.decay_steps is None
    with pytest.raises(ConfigError) as e:
        load_config(str(path), ["optim.lr=abc", "model.num_layerz=3", "nokey"], world_size=1, check_data=False)
    assert any("--set 'nokey': expected KEY=VALUE" in p for p in e.value.problems)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_reports_problems_with_exit_status_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_heads: 3\n")
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert "model.hidden_size (64) must be divisible by model.num_heads (3)" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_passes_dry_run(path, capsys):
    assert main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in ("# resolved config", "# mesh", "parameters:", "model FLOPs per token", "# memory per rank"):
        assert part in out
    head = open(path).read().split("\n", 1)[0]
    assert head.startswith("#") and ("GiB" in open(path).read().split("model:")[0]), "say the hardware and memory"


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "cpu-quickstart.yaml" in names and len(names) >= 5


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, output_norm=False, layer_pattern="LS"),
                                dict(linear_variant="deltanet", conv_size=3), dict(linear_variant="gated_deltanet"),
                                dict(linear_variant="kda", layer_pattern="LLS", num_layers=3),
                                dict(attention_bias=True, qk_norm=True, attention_head_dim=24, layer_pattern="LS"),
                                dict(feature_map="hedgehog", linear_variant="simple_gla", gate_source="key", window=4),
                                dict(feature_map="elu1", linear_variant="gla", window=0),
                                dict(lora_rank=3, lora_targets="q_proj, v_proj,down_proj,gate_proj", qk_norm=True),
                                dict(moe=dict(num_experts=6, top_k=2, ffn_hidden_size=40, shared_ffn_hidden_size=24,
                                              pattern="DM", router="sigmoid", expert_bias=True))])
def test_parameter_count_matches_the_model(kw):
    m = ModelConfig(**kw)
    assert param_counts(m)["total"] == sum(p.numel() for p in LinearLlama(m).parameters())


def test_flops_per_token_knows_the_mixers():
    lin, soft = ModelConfig(layer_pattern="L"), ModelConfig(layer_pattern="S")
    base = 6 * param_counts(lin)["matmul"]
    H, d = lin.num_heads, lin.head_dim
    assert flops_per_token(lin, 1000) == base + lin.num_layers * 12 * H * d * d
    assert flops_per_token(soft, 1000) == base + soft.num_layers * 6 * H * d * 1000
    assert hardware_flops_per_token(lin, 1000) == flops_per_token(lin, 1000) + lin.num_layers * 6 * H * 64 * 2 * d
    assert hardware_flops_per_token(soft, 1000) == flops_per_token(soft, 1000)
    gdn = ModelConfig(layer_pattern="L", linear_variant="gated_deltanet")  # the chunk form, written out
    chunk = 6 * H * (5 * 64 * d + 3 * d * d + d**3 / 64) + 6 * 4 * (H + 2 * gdn.num_kv_heads) * d
    assert flops_per_token(gdn, 1000) == 6 * param_counts(gdn)["matmul"] + gdn.num_layers * chunk


def test_moe_flops_count_the_active_experts():
    moe = dict(num_experts=8, top_k=2, ffn_hidden_size=40, shared_ffn_hidden_size=24, pattern="DM")
    m, dense = ModelConfig(layer_pattern="L", moe=moe), ModelConfig(layer_pattern="L")
    c, h = param_counts(m), m.hidden_size
    moe_layers = m.num_layers // 2
    assert c["experts"] == moe_layers * 8 * 3 * h * 40
    assert c["total"] - c["active"] == moe_layers * 6 * 3 * h * 40  # the 6 experts a token skips
    # per MoE layer, instead of the dense MLP: the router, 2 experts and the shared one
    per_layer = h * 8 + 2 * 3 * h * 40 + 3 * h * 24 - 3 * h * dense.ffn_hidden_size
    assert flops_per_token(m, 1000) == flops_per_token(dense, 1000) + 6 * moe_layers * per_layer


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from lasp.train.config import OptimConfig, ScheduleConfig

    o, s = OptimConfig(lr=1.0), ScheduleConfig(warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(i, o, s, 20) for i in range(25)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[20] == pytest.approx(0.1) and lrs[24] == lrs[20]


def test_more_mistakes_caught_before_any_work(tmp_path):
    problems = "\n".join(_problems({
        "logging": {"interval": 0}, "data": {"seed": -1}, "schedule": {"warmup_steps": 10, "decay_steps": 10},
        "parallel": {"tp": 2, "zero_stage": 1}, "model": {"output_norm": True},
    }, world_size=2))
    for part in ("logging.interval must be >= 1, got 0", "data.seed must be >= 0, got -1",
                 "schedule.decay_steps (10) must be after schedule.warmup_steps (10)",
                 "parallel.zero_stage 1 with parallel.tp = 2 needs model.output_norm = false"):
        assert part in problems, problems


def test_a_held_out_split_shorter_than_a_sequence_is_reported(tmp_path):
    from lasp.data import prepare

    docs = []
    for i, n in enumerate((400, 20)):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text("x" * n)
    for seed in range(50):  # the seeded choice that holds out the short document
        out = tmp_path / f"data{seed}"
        meta = prepare([str(d) for d in docs], str(out), val_fraction=0.5, seed=seed, progress=False)
        if meta["splits"]["val"]["tokens"] < 65:
            break
    data = {"data": {"path": str(out), "seq_len": 64}, "model": {"vocab_size": 260}}
    problems = _problems(data, check_data=True)
    assert any("reads sequences of 65 tokens from the held-out split, which has 21" in p for p in problems), problems
    data["train"] = {"eval_interval": 0}
    resolve(data, "x.yaml", 1, check_data=True)


@pytest.mark.parametrize("value, shown", [("4", "str '4'"), (2.5, "float 2.5"), (True, "bool True")],
                         ids=["str", "float", "bool"])
def test_an_int_field_of_another_type_is_named_with_its_value(value, shown):
    problems = "\n".join(_problems({"model": {"num_heads": value}, "parallel": {"sp": value},
                                    "data": {"seq_len": value}, "train": {"steps": value}}))
    for name in ("model.num_heads", "parallel.sp", "data.seq_len", "train.steps"):
        assert f"{name}: expected int, got {shown}" in problems, problems


@pytest.mark.parametrize("bad", [0, -1])
def test_sizes_below_one_are_reported_once_with_the_rest(bad):
    problems = _problems({"model": {"num_heads": 3, "num_kv_heads": 3, "hidden_size": 96, "norm_eps": 0.0,
                                    "rope_theta": -1.0},
                          "parallel": {"tp": 2, "sp": bad, "microbatches": bad},
                          "data": {"seq_len": bad, "global_batch": bad}, "train": {"max_skipped_steps": -1}},
                         world_size=2)
    for part in [f"data.seq_len must be >= 1, got {bad}", f"data.global_batch must be >= 1, got {bad}",
                 f"parallel.sp must be >= 1, got {bad}", f"parallel.microbatches must be >= 1, got {bad}",
                 "model.norm_eps must be > 0, got 0.0", "model.rope_theta must be > 0, got -1.0",
                 "train.max_skipped_steps must be >= 0, got -1"]:
        assert sum(part in p for p in problems) == 1, (part, problems)
    # a valid model: the TP checks still run beside the bad sizes
    problems = _problems({"model": {"num_heads": 3, "num_kv_heads": 3, "hidden_size": 96},
                          "parallel": {"tp": 2, "sp": bad}, "data": {"seq_len": bad}}, world_size=2)
    assert any("model.num_heads (3) is not divisible by parallel.tp (2)" in p for p in problems), problems


def test_the_rope_rule_follows_the_softmax_layers():
    odd = {"hidden_size": 12, "num_heads": 4, "num_kv_heads": 2}  # head dim 3
    assert any("must be even for RoPE" in p for p in _problems({"model": {**odd, "layer_pattern": "LS"}}))
    assert resolve({"model": {**odd, "layer_pattern": "L"}}, "x.yaml", 1, check_data=False).model.head_dim == 3


def test_unwritable_run_and_checkpoint_directories_are_reported(tmp_path):
    (tmp_path / "file").write_text("")
    problems = _problems({"logging": {"run_dir": str(tmp_path / "file" / "run")},
                          "checkpoint": {"dir": str(tmp_path / "file" / "ckpt")}}, check_data=True)
    for name in ("logging.run_dir", "checkpoint.dir"):
        assert any(p.startswith(f"{name}: cannot write to {tmp_path / 'file'}/") and "is not a directory" in p
                   for p in problems), problems
    assert not (tmp_path / "file").is_dir()


def test_timeouts_must_be_positive():
    text = "\n".join(_problems({"train": {"collective_timeout_s": 0}, "checkpoint": {"timeout_s": -5}}))
    assert "train.collective_timeout_s must be >= 1, got 0" in text
    assert "checkpoint.timeout_s must be >= 1, got -5" in text


def test_a_kernel_without_gates_or_resets_is_refused_before_any_process_group():
    from lasp.train.loop import _check_kernel

    class NoGates:
        name, gates, resets = "triton", (), False

    cfg = resolve({"model": {"linear_variant": "simple_gla"}, "data": {"reset_at_documents": True}}, "x.yaml", 1,
                  check_data=False)
    with pytest.raises(ConfigError, match="(?s)needs a scalar gate, which the 'triton' kernel lacks.*"
                                          "reset_at_documents needs document resets"):
        _check_kernel(cfg, NoGates())
    _check_kernel(cfg, __import__("lasp").kernels.DEFAULT_KERNEL)  # the torch kernel has both
    softmax_only = resolve({"model": {"linear_variant": "gla", "layer_pattern": "S"}}, "x.yaml", 1, check_data=False)
    _check_kernel(softmax_only, NoGates())  # no linear layer: nothing to ask


def test_attention_transfer_names_what_it_needs():
    p = _problems({"model": {"layer_pattern": "S"}, "parallel": {"pp": 2},
                   "train": {"objective": "attention_transfer"}}, world_size=2)
    for part in ["train.objective = attention_transfer trains only the new parameters: set train.trainable = new",
                 "needs linear layers, but model.layer_pattern 'S' has none",
                 "runs with parallel.pp = 1 (every layer's error is summed on one stage), got 2"]:
        assert any(part in q for q in p), p
    assert any("train.objective must be lm or attention_transfer, got 'mse'" in q
               for q in _problems({"train": {"objective": "mse"}}))


def test_distillation_names_what_it_needs():
    p = _problems({"parallel": {"pp": 2}, "train": {"distill_weight": 0.5}}, world_size=2)
    assert any("train.distill_weight runs with parallel.pp = 1" in q for q in p), p
    p = _problems({"train": {"distill_weight": -1.0}})
    assert any("train.distill_weight must be >= 0 (0: no distillation), got -1.0" in q for q in p), p
    p = _problems({"train": {"distill_weight": 1.0, "objective": "attention_transfer", "trainable": "new",
                             "init_from": "x"}})
    assert any("adds to the lm objective, not to attention_transfer" in q for q in p), p


def test_lora_names_what_it_needs():
    p = _problems({"model": {"lora_rank": -1, "lora_alpha": 0, "lora_targets": "q_proj,attn"}})
    for part in ["model.lora_rank must be >= 0 (0: no adapters), got -1", "model.lora_alpha must be > 0, got 0",
                 "model.lora_targets must name projections among q_proj, k_proj, v_proj, o_proj, gate_proj, "
                 "up_proj, down_proj, got 'q_proj,attn'"]:
        assert any(part in q for q in p), p
    p = _problems({"train": {"trainable": "lora"}})
    assert any("train.trainable = lora needs adapters: set model.lora_rank" in q for q in p), p


def test_eval_positions_names_what_it_needs():
    p = _problems({"parallel": {"tp": 2}, "train": {"eval_positions": True, "eval_interval": 0}}, world_size=2)
    assert any("train.eval_positions needs tp = pp = 1, zero_stage 0, the lm objective and evaluations; got "
               "parallel.tp = 2, train.eval_interval = 0" in q for q in p), p
