"""The trainer's configuration: strict YAML, every problem at once with its path, --set, dry runs."""

import dataclasses
import glob
import math
import os
import typing

import pytest
import yaml

from lasp.model import LinearLlama, ModelConfig
from lasp.parallel.config import ParallelConfig
from lasp.train.__main__ import main
from lasp.train.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config, resolve
from lasp.train.flops import flops_per_token, hardware_flops_per_token, param_counts
from lasp.train.optim import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _problems(data, world_size=1, check_data=False):
    with pytest.raises(ConfigError) as e:
        resolve(data, "x.yaml", world_size, check_data)
    return e.value.problems


def test_every_problem_at_once_with_its_path():
    problems = _problems(
        {
            "model": {"num_heads": 6, "num_kv_heads": 6, "hidden_size": 96, "hidden_sise": 3},
            "parallel": {"tp": 4, "sp": 2, "dp": 2, "microbatches": 3, "sp_layout": "zigzag"},
            "data": {"seq_len": 102, "global_batch": 8},
            "optim": {"lr": "fast", "beta2": 1.5},
            "train": {"steps": 0, "dtype": "float16", "activation_checkpointing": "some"},
            "trian": {},
        },
        world_size=16,
    )
    text = "\n".join(problems)
    for part in [
        "trian: unknown section (did you mean 'train'?)",
        "model.hidden_sise: unknown key (did you mean 'hidden_size'?)",
        "optim.lr: expected float, got str 'fast'",
        "train.dtype: expected one of 'float32', 'bfloat16', got str 'float16'",
        "train.activation_checkpointing: expected one of 'none', 'full' or int, got str 'some'",
        "optim.beta2 must be in [0, 1), got 1.5",
        "train.steps must be >= 1, got 0",
        "model.num_heads (6) is not divisible by parallel.tp (4)",
        "sequence length 102 is not divisible by the zigzag layout over parallel.sp = 2 ranks",
        "global batch 8 is not divisible by parallel.dp x parallel.microbatches = 2 x 3",
    ]:
        assert part in text, f"{part!r} not in:\n{text}"


def test_world_size_and_the_data_are_checked(tmp_path):
    problems = _problems(
        {"parallel": {"sp": 2}, "data": {"path": str(tmp_path / "nope"), "seq_len": 64}}, world_size=1, check_data=True
    )
    assert any("world size 1 != tp x sp x pp x dp = 1 x 2 x 1 x 1 = 2" in p for p in problems)
    assert any("nope does not exist" in p and "lasp.data prepare" in p for p in problems)


def test_model_problems_come_with_the_rest():
    problems = _problems({"model": {"hidden_size": 65}, "optim": {"lr": -1.0}})
    assert any("model.hidden_size (65) must be divisible by model.num_heads (4)" in p for p in problems)
    assert any("optim.lr must be > 0, got -1.0" in p for p in problems)


def test_overrides_are_yaml_scalars_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"seq_len": 64}}))
    cfg = load_config(
        str(path),
        ["optim.lr=1e-4", "train.activation_checkpointing=2", "model.tie_embeddings=true", "schedule.decay_steps=null"],
        world_size=1,
        check_data=False,
    )
    assert cfg.optim.lr == 1e-4 and cfg.train.checkpoint_every == 2 and cfg.model.tie_embeddings
    assert cfg.schedule.decay_steps is None
    with pytest.raises(ConfigError) as e:
        load_config(str(path), ["optim.lr=abc", "model.num_layerz=3", "nokey"], world_size=1, check_data=False)
    assert any("--set 'nokey': expected KEY=VALUE" in p for p in e.value.problems)


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "config file: {path} does not exist"),
        (
            b"\x89PNG\r\n\x1a\n\x00\x00",
            "cannot read YAML: not a text file (byte #x89 at byte 0 is not utf-8: invalid start byte)",
        ),
        (
            b"model:\n  hidden_size: 64\xff\n",
            "cannot read YAML: not a text file (byte #xff at byte 24 is not utf-8: invalid start byte)",
        ),
        (
            b"model:\n  \x00",
            "cannot read YAML: not a text file (character #x0000 at character 9: special characters are not allowed)",
        ),
        (
            b"model:\n  layer_pattern: [L\n",
            "cannot read YAML: line 3, column 1: while parsing a flow sequence: "
            "expected ',' or ']', but got '<stream end>'",
        ),
        (
            b"model:\n\tnum_heads: 4\n",
            "cannot read YAML: line 2, column 1: while scanning for the next token: found character '\\t' that cannot "
            "start any token",
        ),
        (b"- model\n- optim\n", "the top level must be a mapping of sections, got list"),
        (b"just some text\n", "the top level must be a mapping of sections, got str"),
    ],
    ids=["missing", "binary", "not-utf8", "nul", "syntax", "tab", "list", "text"],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_problem_naming_it(tmp_path, content, problem):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(str(path), world_size=1, check_data=False)
    assert e.value.problems == [problem.format(path=path)]
    assert str(e.value).startswith(f"{path}: 1 problem(s)")


@pytest.mark.parametrize(
    "content, overrides, flag, problem",
    [
        (
            "model:\n  num_heads: 3\n",
            [],
            "--dry-run",
            "model.hidden_size (64) must be divisible by model.num_heads (3)",
        ),
        (bytes(range(128, 256)), [], "--check-only", "cannot read YAML: not a text file (byte #x80 at byte 0"),
        ("", ["optim.lr=.nan"], "--dry-run", "optim.lr: nan is not a finite number"),
        (
            "",
            ["optim.lr=inf", "optim.grad_clip=nan"],
            "--check-only",
            "optim.lr: inf is not a finite number\n  optim.grad_clip: nan is not a finite number",
        ),
    ],
    ids=["model", "binary", "nan-lr", "inf-lr"],
)
def test_cli_reports_problems_with_exit_status_2(tmp_path, capsys, content, overrides, flag, problem):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["--config", str(path), *sets, flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and problem in err and "Traceback" not in err, err


def _float_fields(cls, prefix=""):
    """YAML paths of every float field (float or float | None) of dataclass `cls` and of its sections, optional
    ones (model.moe) included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if sections:
            yield from _float_fields(sections[0], f"{prefix}{f.name}.")
        elif float in args:
            yield prefix + f.name


FLOAT_FIELDS = list(_float_fields(TrainConfig))


def _at(path, value, **sections):
    """The config dict with `value` at the YAML path `path` (a.b.c), beside `sections`."""
    data = {k: dict(v) for k, v in sections.items()}
    *parents, key = path.split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
    node[key] = value
    return data


def test_the_float_fields_are_all_found():
    assert {
        "optim.lr",
        "optim.grad_clip",
        "schedule.min_lr_ratio",
        "train.max_minutes",
        "model.norm_eps",
        "model.init_std",
        "model.moe.aux_loss_coeff",
        "model.moe.capacity_factor",
    } <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("path", FLOAT_FIELDS)
def test_a_float_field_refuses_nan_and_inf_by_name(path):
    # "nan" and "1e999": YAML 1.1 reads them as a string, which a float field takes as the number it spells
    for value, shown in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), ("nan", "nan"), ("1e999", "inf")):
        assert _problems(_at(path, value)) == [f"{path}: {shown} is not a finite number"], value
    huge = 10**400  # an int past a float's range (YAML's 1000...0): no OverflowError, a message
    assert _problems(_at(path, huge)) == [f"{path}: {huge} is not a finite number (beyond a float's range)"]


def test_a_model_config_built_in_python_refuses_nan_and_inf_by_name():
    from lasp.model import ModelConfig

    for field in ("rope_theta", "norm_eps", "init_std", "rope_factor"):
        for value in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"model.{field}: {value} is not a finite number"):
                ModelConfig(**{field: value})


RANGES = [
    ("optim.lr", 0.0, "optim.lr must be > 0, got 0.0"),
    ("optim.eps", -1e-8, "optim.eps must be > 0, got -1e-08"),
    ("optim.beta1", -0.1, "optim.beta1 must be in [0, 1), got -0.1"),
    ("optim.beta2", 1, "optim.beta2 must be in [0, 1), got 1.0"),
    ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0, got -0.1"),
    ("optim.grad_clip", -1.0, "optim.grad_clip must be >= 0 (0: no clipping), got -1.0"),
    ("schedule.min_lr_ratio", 1.5, "schedule.min_lr_ratio must be in [0, 1], got 1.5"),
    ("train.max_minutes", 0.0, "train.max_minutes must be > 0 (or null for no limit), got 0.0"),
    ("train.distill_weight", -0.5, "train.distill_weight must be >= 0 (0: no distillation), got -0.5"),
    ("model.rope_theta", 0.0, "model.rope_theta must be > 0, got 0.0"),
    ("model.norm_eps", -1e-5, "model.norm_eps must be > 0, got -1e-05"),
    ("model.gate_normalizer", 0.0, "model.gate_normalizer must be > 0, got 0.0"),
    ("model.lora_alpha", -2.0, "model.lora_alpha must be > 0, got -2.0"),
    ("model.init_std", -0.02, "model.init_std must be >= 0, got -0.02"),
    ("model.moe.bias_update_rate", -1e-3, "model.moe.bias_update_rate must be >= 0, got -0.001"),
    ("model.moe.aux_loss_coeff", -0.01, "model.moe.aux_loss_coeff must be >= 0, got -0.01"),
    ("model.moe.z_loss_coeff", -1.0, "model.moe.z_loss_coeff must be >= 0, got -1.0"),
    ("model.moe.capacity_factor", 0.0, "model.moe.capacity_factor must be > 0 or null (dropless), got 0.0"),
]


@pytest.mark.parametrize("path, value, problem", RANGES, ids=[path for path, _, _ in RANGES])
def test_a_float_out_of_its_range_is_named_with_its_value(path, value, problem):
    assert _problems(_at(path, value)) == [problem]


@pytest.mark.parametrize("name", ["rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"])
def test_the_llama3_rope_factors_must_be_positive(name):
    problems = _problems(_at(f"model.{name}", 0.0, model={"rope_scaling": "llama3"}))
    assert f"model.{name} must be > 0, got 0.0" in problems, problems


def test_the_edges_of_the_ranges_are_allowed():
    zero = {
        "optim": {"grad_clip": 0, "weight_decay": 0, "beta1": 0, "beta2": 0},
        "schedule": {"min_lr_ratio": 0},
        "train": {"distill_weight": 0},
        "model": {"init_std": 0, "moe": {"aux_loss_coeff": 0, "z_loss_coeff": 0, "bias_update_rate": 0}},
    }
    cfg = resolve(zero, "x.yaml", 1, check_data=False)
    assert cfg.optim.grad_clip == 0.0 and cfg.model.moe.aux_loss_coeff == 0.0
    assert resolve({"schedule": {"min_lr_ratio": 1}}, "x.yaml", 1, check_data=False).schedule.min_lr_ratio == 1.0


def test_bad_numbers_in_every_section_are_reported_together():
    problems = _problems(
        {
            "optim": {"lr": math.nan, "grad_clip": -1.0, "beta2": 1.0},
            "train": {"max_minutes": 0.0},
            "model": {
                "init_std": math.inf,
                "norm_eps": 0.0,
                "moe": {"capacity_factor": -math.inf, "z_loss_coeff": -1.0},
            },
        }
    )
    assert sorted(problems) == sorted(
        [
            "optim.lr: nan is not a finite number",
            "optim.grad_clip must be >= 0 (0: no clipping), got -1.0",
            "optim.beta2 must be in [0, 1), got 1.0",
            "train.max_minutes must be > 0 (or null for no limit), got 0.0",
            "model.init_std: inf is not a finite number",
            "model.norm_eps must be > 0, got 0.0",
            "model.moe.capacity_factor: -inf is not a finite number",
            "model.moe.z_loss_coeff must be >= 0, got -1.0",
        ]
    )


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_passes_dry_run(path, capsys):
    assert main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in ("# resolved config", "# mesh", "parameters:", "model FLOPs per token", "# memory per rank"):
        assert part in out
    if "deltaproduct" in path:
        assert "deltaproduct: 2 delta-rule steps per token, so each linear layer's core runs 2 x the tokens" in out
    if "mom" in path:
        assert "4 memories per head, plus a shared one, each token routed to 2" in out
    head = open(path).read().split("\n", 1)[0]
    assert head.startswith("#") and ("GiB" in open(path).read().split("model:")[0]), "say the hardware and memory"


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert "cpu-quickstart.yaml" in names and len(names) >= 5


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tie_embeddings=True, output_norm=False, layer_pattern="LS"),
        dict(linear_variant="deltanet", conv_size=3),
        dict(linear_variant="gated_deltanet"),
        dict(linear_variant="kda", layer_pattern="LLS", num_layers=3),
        dict(linear_variant="deltaproduct", num_householder=3, num_kv_heads=1),
        dict(linear_variant="gated_deltanet", mom_num_memories=3, mom_shared_memory=True),
        dict(linear_variant="gla", mom_num_memories=4, mom_top_k=3),
        dict(attention_bias=True, qk_norm=True, attention_head_dim=24, layer_pattern="LS"),
        dict(feature_map="hedgehog", linear_variant="simple_gla", gate_source="key", window=4),
        dict(feature_map="elu1", linear_variant="gla", window=0),
        dict(lora_rank=3, lora_targets="q_proj, v_proj,down_proj,gate_proj", qk_norm=True),
        dict(
            moe=dict(
                num_experts=6,
                top_k=2,
                ffn_hidden_size=40,
                shared_ffn_hidden_size=24,
                pattern="DM",
                router="sigmoid",
                expert_bias=True,
            )
        ),
    ],
)
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
    # DeltaProduct: each of n steps a token of the chunk form; n keys and values through the convolutions
    dp = ModelConfig(layer_pattern="L", linear_variant="deltaproduct", num_householder=3)
    chunk = 3 * 6 * H * (5 * 64 * d + 3 * d * d + d**3 / 64) + 6 * 4 * (H + 2 * 3 * dp.num_kv_heads) * d
    assert flops_per_token(dp, 1000) == 6 * param_counts(dp)["matmul"] + dp.num_layers * chunk
    # MoM: the routed memories (top 2 of 4) as heads, their projections only (keys, values, the gate's up one)
    mom = ModelConfig(layer_pattern="L", linear_variant="gla", mom_num_memories=4, mom_top_k=2)
    c = param_counts(mom)
    idle = 2 * (2 * mom.hidden_size * mom.num_kv_heads * d + mom.gate_low_rank * H * d)
    assert c["total"] - c["active"] == mom.num_layers * idle
    assert flops_per_token(mom, 1000) == 6 * c["active_matmul"] + mom.num_layers * 12 * H * 2 * d * d
    assert hardware_flops_per_token(mom, 1000) > flops_per_token(mom, 1000) + mom.num_layers * 6 * idle


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
    problems = "\n".join(
        _problems(
            {
                "logging": {"interval": 0},
                "data": {"seed": -1},
                "schedule": {"warmup_steps": 10, "decay_steps": 10},
                "parallel": {"tp": 2, "zero_stage": 1},
                "model": {"output_norm": True},
            },
            world_size=2,
        )
    )
    for part in (
        "logging.interval must be >= 1, got 0",
        "data.seed must be >= 0, got -1",
        "schedule.decay_steps (10) must be after schedule.warmup_steps (10)",
        "parallel.zero_stage 1 with parallel.tp = 2 needs model.output_norm = false",
    ):
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


@pytest.mark.parametrize(
    "value, shown", [("4", "str '4'"), (2.5, "float 2.5"), (True, "bool True")], ids=["str", "float", "bool"]
)
def test_an_int_field_of_another_type_is_named_with_its_value(value, shown):
    problems = "\n".join(
        _problems(
            {
                "model": {"num_heads": value},
                "parallel": {"sp": value},
                "data": {"seq_len": value},
                "train": {"steps": value},
            }
        )
    )
    for name in ("model.num_heads", "data.seq_len", "train.steps"):
        assert f"{name}: expected int, got {shown}" in problems, problems
    assert f"parallel.sp: expected int or a list of int, got {shown}" in problems, problems  # or allowed degrees


@pytest.mark.parametrize("bad", [0, -1])
def test_sizes_below_one_are_reported_once_with_the_rest(bad):
    problems = _problems(
        {
            "model": {"num_heads": 3, "num_kv_heads": 3, "hidden_size": 96, "norm_eps": 0.0, "rope_theta": -1.0},
            "parallel": {"tp": 2, "sp": bad, "microbatches": bad},
            "data": {"seq_len": bad, "global_batch": bad},
            "train": {"max_skipped_steps": -1},
        },
        world_size=2,
    )
    for part in [
        f"data.seq_len must be >= 1, got {bad}",
        f"data.global_batch must be >= 1, got {bad}",
        f"parallel.sp must be >= 1, got {bad}",
        f"parallel.microbatches must be >= 1, got {bad}",
        "model.norm_eps must be > 0, got 0.0",
        "model.rope_theta must be > 0, got -1.0",
        "train.max_skipped_steps must be >= 0, got -1",
    ]:
        assert sum(part in p for p in problems) == 1, (part, problems)
    # a valid model: the TP checks still run beside the bad sizes
    problems = _problems(
        {
            "model": {"num_heads": 3, "num_kv_heads": 3, "hidden_size": 96},
            "parallel": {"tp": 2, "sp": bad},
            "data": {"seq_len": bad},
        },
        world_size=2,
    )
    assert any("model.num_heads (3) is not divisible by parallel.tp (2)" in p for p in problems), problems


def test_the_rope_rule_follows_the_softmax_layers():
    odd = {"hidden_size": 12, "num_heads": 4, "num_kv_heads": 2}  # head dim 3
    assert any("must be even for RoPE" in p for p in _problems({"model": {**odd, "layer_pattern": "LS"}}))
    assert resolve({"model": {**odd, "layer_pattern": "L"}}, "x.yaml", 1, check_data=False).model.head_dim == 3


def test_unwritable_run_and_checkpoint_directories_are_reported(tmp_path):
    (tmp_path / "file").write_text("")
    problems = _problems(
        {
            "logging": {"run_dir": str(tmp_path / "file" / "run")},
            "checkpoint": {"dir": str(tmp_path / "file" / "ckpt")},
        },
        check_data=True,
    )
    for name in ("logging.run_dir", "checkpoint.dir"):
        assert any(
            p.startswith(f"{name}: cannot write to {tmp_path / 'file'}/") and "is not a directory" in p
            for p in problems
        ), problems
    assert not (tmp_path / "file").is_dir()


def test_timeouts_must_be_positive():
    text = "\n".join(_problems({"train": {"collective_timeout_s": 0}, "checkpoint": {"timeout_s": -5}}))
    assert "train.collective_timeout_s must be >= 1, got 0" in text
    assert "checkpoint.timeout_s must be >= 1, got -5" in text


def test_a_kernel_without_gates_or_resets_is_refused_before_any_process_group():
    from lasp.kernels.protocol import Capabilities
    from lasp.train.loop import _check_kernel

    class NoGates:
        name, caps = "triton", Capabilities()

    cfg = resolve(
        {"model": {"linear_variant": "simple_gla"}, "data": {"reset_at_documents": True}}, "x.yaml", 1, check_data=False
    )
    with pytest.raises(
        ConfigError,
        match="(?s)needs a scalar gate, which the 'triton' kernel lacks.*reset_at_documents needs document resets",
    ):
        _check_kernel(cfg, NoGates())
    _check_kernel(cfg, __import__("lasp").kernels.DEFAULT_KERNEL)  # the torch kernel has both
    softmax_only = resolve({"model": {"linear_variant": "gla", "layer_pattern": "S"}}, "x.yaml", 1, check_data=False)
    _check_kernel(softmax_only, NoGates())  # no linear layer: nothing to ask


def test_attention_transfer_names_what_it_needs():
    p = _problems(
        {"model": {"layer_pattern": "S"}, "parallel": {"pp": 2}, "train": {"objective": "attention_transfer"}},
        world_size=2,
    )
    for part in [
        "train.objective = attention_transfer trains only the new parameters: set train.trainable = new",
        "needs linear layers, but model.layer_pattern 'S' has none",
        "runs with parallel.pp = 1 (every layer's error is summed on one stage), got 2",
    ]:
        assert any(part in q for q in p), p
    assert any(
        "train.objective: expected one of 'lm', 'attention_transfer', got str 'mse'" in q
        for q in _problems({"train": {"objective": "mse"}})
    )
    # a softmax teacher has no keys for DeltaProduct's steps or MoM's memories
    for model, n in (
        ({"linear_variant": "deltaproduct", "num_householder": 3}, 3),
        ({"linear_variant": "gated_deltanet", "mom_num_memories": 2}, 2),
    ):
        p = _problems({"model": model, "train": {"distill_weight": 0.5}})
        assert any(f"this model's layers have {n} keys and values per head and token" in q for q in p), p


def test_the_config_checks_itself_and_probes_apart(tmp_path):
    """The rules across sections are the config's problems(), the file-system probes its preflight(): a
    config built in Python is checked the same way as one read from YAML."""
    cfg = TrainConfig(
        parallel=ParallelConfig(pp=2),
        data=DataConfig(path=str(tmp_path / "none")),
        train=RunConfig(distill_weight=0.5, resume=str(tmp_path / "nowhere")),
    )
    assert any("train.distill_weight runs with parallel.pp = 1" in q for q in cfg.problems(world_size=2))
    assert not any("data.path" in q for q in cfg.problems(world_size=2))  # no file is read
    probes = cfg.preflight()
    assert any(q.startswith("data.path") and "python -m lasp.data prepare" in q for q in probes), probes
    assert any(q.startswith(f"train.resume: {tmp_path / 'nowhere'}") for q in probes), probes
    assert cfg.problems(world_size=2, broken=frozenset({"parallel"})) == []  # its rules skipped


def test_distillation_names_what_it_needs():
    p = _problems({"parallel": {"pp": 2}, "train": {"distill_weight": 0.5}}, world_size=2)
    assert any("train.distill_weight runs with parallel.pp = 1" in q for q in p), p
    p = _problems({"train": {"distill_weight": -1.0}})
    assert any("train.distill_weight must be >= 0 (0: no distillation), got -1.0" in q for q in p), p
    p = _problems(
        {"train": {"distill_weight": 1.0, "objective": "attention_transfer", "trainable": "new", "init_from": "x"}}
    )
    assert any("adds to the lm objective, not to attention_transfer" in q for q in p), p


def test_lora_names_what_it_needs():
    p = _problems({"model": {"lora_rank": -1, "lora_alpha": 0, "lora_targets": "q_proj,attn"}})
    for part in [
        "model.lora_rank must be >= 0 (0: no adapters), got -1",
        "model.lora_alpha must be > 0, got 0",
        "model.lora_targets must name projections among q_proj, k_proj, v_proj, o_proj, gate_proj, "
        "up_proj, down_proj, got 'q_proj,attn'",
    ]:
        assert any(part in q for q in p), p
    p = _problems({"train": {"trainable": "lora"}})
    assert any("train.trainable = lora needs adapters: set model.lora_rank" in q for q in p), p


def test_eval_positions_names_what_it_needs():
    p = _problems({"parallel": {"tp": 2}, "train": {"eval_positions": True, "eval_interval": 0}}, world_size=2)
    assert any(
        "train.eval_positions needs tp = pp = 1, zero_stage 0, the lm objective and evaluations; got "
        "parallel.tp = 2, train.eval_interval = 0" in q
        for q in p
    ), p


ELASTIC = [  # (parallel section, data, world size) -> (tp, sp, pp, dp, microbatches) and a part of the why
    ({"sp": [4, 2], "dp": "auto"}, {"global_batch": 8}, 8, (1, 4, 1, 2, 1), "sp 4, the largest of the allowed [4, 2]"),
    (
        {"sp": [4, 2], "dp": "auto", "micro_batch_size": 1},
        {"global_batch": 8},
        6,
        None,  # sp 4 does not divide 6; sp 2 makes dp 3, which does not divide the global batch
        "none of the allowed degrees [4, 2] fits 6 ranks: sp = 4: dp auto: tp x sp x pp = 1 x 4 x 1 = 4 does not "
        "divide the 6 ranks | sp = 2: micro_batch_size: data.global_batch 8 is not divisible by dp x "
        "micro_batch_size = 3 x 1",
    ),
    (
        {"sp": [4, 2], "dp": "auto", "micro_batch_size": 2},
        {"global_batch": 8},
        2,
        (1, 2, 1, 1, 4),
        "sp 2, the largest of the allowed [4, 2] that fits (sp = 4: dp auto: tp x sp x pp = 1 x 4 x 1 = 4 does not "
        "divide the 2 ranks), dp auto = 2 / (tp x sp x pp), 4 microbatch(es) of 2 row(s) per rank",
    ),
    # the largest degree that divides the world but not the sequence is passed over, with its reason
    ({"sp": [4, 2], "dp": "auto"}, {"seq_len": 68}, 4, (1, 2, 1, 2, 1), "not divisible by the zigzag layout"),
    ({"tp": 2, "sp": 2, "dp": "auto"}, {"global_batch": 4}, 8, (2, 2, 1, 2, 1), "dp auto = 8 / (tp x sp x pp)"),
    ({"sp": 2, "dp": 1}, {}, 2, (1, 2, 1, 1, 1), "2 rank(s) = tp 1 x sp 2 x pp 1 x dp 1, as configured"),
    ({"sp": 2, "dp": "auto"}, {}, None, (1, 2, 1, 1, 1), "dp auto = 1 (no world size given)"),  # a dry run
    (
        {"sp": 1, "dp": "auto", "micro_batch_size": 1, "microbatches": 3},
        {"global_batch": 8},
        2,
        None,
        "parallel.microbatches (3) disagrees with parallel.micro_batch_size (1), which makes 4",
    ),
    ({"sp": [], "dp": "some"}, {}, 2, None, "parallel.sp: an empty list allows no SP degree"),
    ({"sp": [2, 2, 0], "dp": "some"}, {}, 2, None, "parallel.dp must be a whole number or auto, got 'some'"),
    ({"sp": [2, "x"]}, {}, 2, None, "parallel.sp: expected int or a list of int, got list [2, 'x']"),
    ({"sp": 2, "dp": "auto", "zero_stage": 2}, {}, 4, None, "parallel.zero_stage 2 cannot follow a world that changes"),
    # a problem no degree escapes is said once, without a line per degree
    ({"tp": 3, "sp": [2, 1], "dp": "auto"}, {}, 6, None, "model.num_heads (4) is not divisible by parallel.tp (3)"),
]


@pytest.mark.parametrize("par, data, world, want, why", ELASTIC)
def test_an_elastic_layout_is_settled_for_the_world_or_refused_naming_each_degree(par, data, world, want, why):
    cfg = {"parallel": par, "data": {"seq_len": 64, "global_batch": 8, **data}}
    if want is None:
        problems = _problems(cfg, world_size=world)
        assert why in "\n".join(problems), problems
        if "tp" in par:
            assert not any("none of the allowed degrees" in q for q in problems), problems
        return
    c = resolve(cfg, "x.yaml", world, check_data=False)
    p = c.parallel
    assert (p.tp, p.sp, p.pp, p.dp, p.microbatches) == want and why in c.layout_why, c.layout_why


def test_check_only_takes_every_world_an_elastic_launch_may_form(capsys):
    args = ["--config", os.path.join(ROOT, "configs/cpu-quickstart.yaml"), "--check-only", "--set", "data.path=/no"]
    assert main([*args, "--world-size", "2,4", "--set", "parallel.dp=auto"]) == 2
    err = capsys.readouterr().err
    assert "data.path: /no does not exist" in err and "processes:" not in err  # the data once; both worlds fit
    assert main([*args, "--world-size", "2,3", "--set", "parallel.sp=[4,2]", "--set", "parallel.dp=auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("data.path: /no does not exist") == 1 and "with 2 processes" not in err
    assert "with 3 processes: parallel.sp: none of the allowed degrees [4, 2] fits 3 ranks" in err
