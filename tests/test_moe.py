"""Mixture-of-experts layers: the single-device MoE equals a dense computation of the same routing and
experts, bad configs are refused by name. Their parallel runs (EP with DP, SP, TP, PP) are cases of
tests/test_parallel.py; checkpoints of tests/test_checkpoint.py."""

import dataclasses

import pytest
import torch

from lasp.model import LinearLlama, ModelConfig, lm_loss_sum
from lasp.model.moe import MoE, MoEConfig, aux_loss

MODEL = dict(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, layer_pattern="LS"
)


def _dense(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on every token, combined with weights written out from the definitions: (output, the
    balancing + z-loss)."""
    cfg, flat = moe.cfg, x.reshape(-1, x.shape[-1])
    logits = flat @ moe.router.weight.T
    if cfg.router == "softmax":
        probs = torch.softmax(logits.float(), -1).to(logits.dtype)
        chosen = probs.topk(cfg.top_k, dim=1)[1]
        mask = torch.zeros_like(probs).scatter(1, chosen, 1.0)
        weights = probs * mask / (probs * mask).sum(-1, keepdim=True)
        scores = torch.softmax(logits, -1, dtype=torch.float32)
    else:
        s = torch.sigmoid(logits.float()).to(logits.dtype)
        mask = torch.zeros_like(s).scatter(1, (s + moe.expert_bias).topk(cfg.top_k, dim=1)[1], 1.0)
        weights = s * mask / (s * mask).sum(-1, keepdim=True)
        scores = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    every = torch.stack([e(flat) for e in moe.experts], dim=1)  # [N, E, hidden]
    out = (weights.unsqueeze(-1) * every).sum(1).view_as(x)
    if moe.shared is not None:
        out = out + moe.shared(x)
    n, e = logits.shape
    counts = torch.zeros_like(scores).scatter(1, scores.topk(cfg.top_k, dim=1)[1], 1.0).sum(0)
    balance = e / (cfg.top_k * n * n) * (scores.sum(0) * counts).sum() * cfg.aux_loss_coeff
    z = torch.logsumexp(logits, -1).square().mean() * cfg.z_loss_coeff
    return out, balance + z


@pytest.mark.parametrize(
    "moe",
    [
        dict(num_experts=4, top_k=2, ffn_hidden_size=24, aux_loss_coeff=0.1, z_loss_coeff=0.01),
        dict(num_experts=6, top_k=3, ffn_hidden_size=16, shared_ffn_hidden_size=8, pattern="DM"),
        dict(num_experts=4, top_k=2, ffn_hidden_size=16, router="sigmoid", expert_bias=True, aux_loss_coeff=0.05),
    ],
    ids=["softmax", "shared-every-other", "sigmoid-bias"],
)
def test_the_model_equals_a_dense_computation_of_the_same_routing(moe):
    torch.manual_seed(0)
    model = LinearLlama(ModelConfig(**MODEL, moe=moe)).double()
    for m in model.modules():
        if isinstance(m, MoE) and m.expert_bias is not None:
            m.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # the choice, not the weights
    tokens = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(1))
    loss = lm_loss_sum(model(tokens[:, :-1]), tokens[:, 1:]) / 48 + aux_loss(model)
    params = list(model.parameters())
    # an expert no token chose gets no gradient (zero in the dense computation)
    got = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))
    ]

    moes = [b.mlp for b in model.layers if isinstance(b.mlp, MoE)]
    assert len(moes) == (1 if moe.get("pattern") == "DM" else 2)
    originals = {m: m.forward for m in moes}
    extra = []
    for m in moes:

        def dense(x, m=m):
            out, a = _dense(m, x)
            extra.append(a)
            return out

        m.forward = dense
    want_loss = lm_loss_sum(model(tokens[:, :-1]), tokens[:, 1:]) / 48 + sum(extra)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    for m in moes:
        m.forward = originals[m]
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)  # the balancing loss is float32
    names = [n for n, _ in model.named_parameters()]
    assert any(".router." in n for n in names)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_the_expert_bias_moves_against_the_load_and_never_by_gradient():
    torch.manual_seed(0)
    moe = MoE(
        16,
        MoEConfig(num_experts=4, top_k=1, ffn_hidden_size=8, router="sigmoid", expert_bias=True, bias_update_rate=0.5),
    )
    assert "expert_bias" in dict(moe.named_buffers()) and "expert_bias" not in dict(moe.named_parameters())
    moe.load = torch.tensor([5.0, 1.0, 2.0, 0.0])  # mean 2
    moe.update_expert_bias()
    assert moe.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.5] and moe.load.sum() == 0
    moe(torch.randn(3, 7, 16))
    assert moe.load.sum() == 21  # top-1: every token once


def test_capacity_drops_the_lowest_weights_beyond_it():
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(num_experts=2, top_k=1, ffn_hidden_size=4, capacity_factor=0.5))
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7]))
    x = torch.zeros(1, 8, 8)
    x[0, :, 0] = torch.arange(1.0, 9.0)  # every token prefers expert 0, the later ones more
    moe.train()
    moe(x)
    assert moe.load.tolist() == [2.0, 0.0]  # capacity ceil(8 x 1 / 2 x 0.5) = 2: the two strongest tokens


def test_bad_moe_configs_are_refused_every_problem_at_once():
    with pytest.raises(ValueError) as e:
        ModelConfig(
            **MODEL,
            moe=dict(
                num_experts=2,
                top_k=3,
                router="topk",
                pattern="MX",
                capacity_factor=0,
                aux_loss_coeff=-1,
                shared_ffn_hidden_size=-2,
            ),
        )
    msg = str(e.value)
    for part in [
        "model.moe.top_k (3) must be at most model.moe.num_experts (2)",
        "model.moe.router must be one of softmax, sigmoid, got 'topk'",
        "model.moe.pattern must be a non-empty string of M (MoE) and D (dense), got 'MX'",
        "model.moe.capacity_factor must be > 0",
        "model.moe.aux_loss_coeff must be >= 0, got -1",
        "model.moe.shared_ffn_hidden_size must be >= 0",
    ]:
        assert part in msg, msg
    with pytest.raises(ValueError, match="expert_bias .* needs model.moe.router sigmoid"):
        MoEConfig(expert_bias=True)
    with pytest.raises(ValueError, match="LoRA on the feed-forward layers"):
        ModelConfig(**MODEL, moe={}, lora_rank=4, lora_targets="q_proj,up_proj")


def test_bad_expert_layouts_name_the_numbers():
    from lasp.parallel import ParallelConfig

    moe = ModelConfig(**MODEL, moe=dict(num_experts=6, ffn_hidden_size=15, shared_ffn_hidden_size=9))
    cases = [
        (dict(dp=2, sp=2, ep=4), moe, 4, ["model.moe.num_experts (6) is not divisible by parallel.ep (4)"]),
        (dict(dp=3, ep=2), moe, 3, ["parallel.ep (2) must divide parallel.dp x parallel.sp = 3 x 1 = 3"]),
        (
            dict(tp=2, etp=2),
            moe,
            2,
            [
                "model.moe.ffn_hidden_size (15) is not divisible by parallel.etp (2)",
                "model.moe.shared_ffn_hidden_size (9) is not divisible by parallel.tp (2)",
            ],
        ),
        (dict(tp=2, etp=3), moe, 2, ["parallel.etp must be 1 or parallel.tp (2), got 3"]),
        (dict(dp=2, ep=2), ModelConfig(**MODEL), 2, ["parallel.ep = 2 needs mixture-of-experts layers"]),
        (dict(dp=2, zero_stage=1), moe, 2, ["model.moe needs parallel.zero_stage 0, got 1"]),
    ]
    for kw, model, world, parts in cases:
        with pytest.raises(ValueError) as e:
            ParallelConfig(**kw).check(model, world, 96, 6)
        assert all(p in str(e.value) for p in parts), (kw, str(e.value))


def test_the_yaml_section_is_typed_and_checked():
    from lasp.train import schema

    problems = []
    schema.build(ModelConfig, {"moe": {"num_experts": "8", "topk": 2}}, "model", problems)
    assert problems == [
        "model.moe.num_experts: expected int, got str '8'",
        "model.moe.topk: unknown key (did you mean 'top_k'?)",
    ], problems
    problems = []
    cfg = schema.build(ModelConfig, {"moe": {"num_experts": 4}}, "model", problems)
    assert problems == [] and cfg.moe.num_experts == 4 and schema.build(ModelConfig, {}, "model", []).moe is None
    assert ModelConfig(**dataclasses.asdict(cfg)).moe == cfg.moe  # as checkpoints and exports read it back


def test_activation_checkpointing_counts_each_token_once():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8))
    x = torch.randn(2, 5, 16, requires_grad=True)
    checkpoint(moe, x, use_reentrant=False).sum().backward()  # the backward re-runs the forward
    assert moe.load.sum() == 2 * 5 * 2 and moe.last_aux is not None
