"""Linear-Llama under TP x SP x PP x DP on gloo processes: loss and every gradient equal one process."""

import pytest
import torch
import torch.distributed as dist

from lasp.model import LinearLlama, ModelConfig, lm_loss_sum
from tests.dist import assert_close_rel

MODEL = dict(
    vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, layer_pattern="LLLS"
)
SEQ, BATCH = 96, 2
MOE = dict(num_experts=4, top_k=2, ffn_hidden_size=32, aux_loss_coeff=0.1, z_loss_coeff=0.01)
TOL = {"f64": 1e-10, "f32": 1e-5}


def _with_lora_b(model, std):
    """LoRA's B starts at zero, where A gets no gradient: draw it (the same on every rank) to test both."""
    if std:
        gen = torch.Generator().manual_seed(11)
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def _reference(cfg, tokens, dtype, steps, lr, eos_id=None, lora_b=0.0, parts=1):
    """One process. With MoE layers the balancing losses are per part of the batch (`parts` = dp x
    microbatches contiguous row blocks, as the ranks see them), averaged (lasp.parallel.ep's convention)."""
    from lasp.kernels.documents import Documents
    from lasp.model.moe import MoE, aux_loss

    torch.manual_seed(0)
    model = _with_lora_b(LinearLlama(cfg).to(dtype), lora_b)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = aux = 0.0
        for rows in tokens.chunk(parts if cfg.moe else 1, dim=0):
            docs = None if eos_id is None else Documents.from_eos(rows[:, :-1], eos_id)
            loss = loss + lm_loss_sum(model(rows[:, :-1], documents=docs), rows[:, 1:]) / tokens[:, 1:].numel()
            if cfg.moe:
                aux = aux + aux_loss(model) / parts
        (loss + aux).backward()
        losses.append(loss.item())  # the LM loss: train_step reports it (the MoE losses are logged apart)
        if steps > 1:
            opt.step()
            for m in model.modules():
                if isinstance(m, MoE):
                    m.update_expert_bias()
    return model, losses


def case_parallel(
    tp,
    sp,
    pp,
    dp,
    layout="zigzag",
    dtype="f64",
    microbatches=1,
    steps=1,
    lr=1e-2,
    loss_chunk_tokens=4096,
    eos_id=None,
    lora_b=0.0,
    ep=1,
    etp=1,
    sp_method=None,
    **model_kw,
):
    from lasp.parallel import ParallelConfig, init_groups, parallelize, train_step
    from lasp.parallel.config import SpMethodConfig
    from lasp.parallel.ep import moe_step
    from lasp.parallel.mesh import coords

    dt = {"f64": torch.float64, "f32": torch.float32}[dtype]
    cfg = ModelConfig(**{**MODEL, **model_kw})
    pcfg = ParallelConfig(
        tp=tp,
        sp=sp,
        pp=pp,
        dp=dp,
        sp_layout=layout,
        microbatches=microbatches,
        loss_chunk_tokens=loss_chunk_tokens,
        ep=ep,
        etp=etp,
        sp_method=SpMethodConfig(**(sp_method or {})),
    )
    pcfg.check(cfg, dist.get_world_size(), SEQ, BATCH)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))
    if eos_id is not None:  # packed documents: 1-token ones, a start at the middle, on a chunk boundary
        tokens[tokens == eos_id] = eos_id + 1
        tokens[0, [3, 4, 23, 47, 60]] = tokens[1, [11, 70]] = eos_id
    ref, ref_losses = _reference(cfg, tokens, dt, steps, lr, eos_id, lora_b, parts=dp * microbatches)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    groups = init_groups(pcfg)
    c = coords(pcfg)[dist.get_rank()]  # the picture in the README is megatron's mesh
    assert (c.tp, c.sp, c.dp, c.pp) == (groups.tp_rank, groups.sp_rank, groups.dp_rank, groups.pp_rank)
    if ep > 1:  # the EP groups the mesh picture shows are the ones the all-to-all runs on
        from lasp.parallel.mesh import ep_groups

        assert dist.get_process_group_ranks(groups.ep) in ep_groups(pcfg)
    torch.manual_seed(0)
    stage = parallelize(_with_lora_b(LinearLlama(cfg).to(dt), lora_b), pcfg, groups)
    opt = torch.optim.AdamW(stage.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(train_step(stage, tokens, pcfg, groups, eos_id=eos_id))
        if steps > 1:
            opt.step()
            moe_step(stage, pcfg, cfg.moe, cfg.num_layers, tokens[:, 1:].numel())
    checked = 0
    if steps == 1:
        for p in stage.parameters():
            want = ref_grads[p.full_name]
            if getattr(p, "tp_dim", None) is not None:
                want = want.chunk(tp, dim=p.tp_dim)[groups.tp_rank]
            assert_close_rel(p.grad, want, TOL[dtype], p.full_name)
            checked += 1
    if stage.is_last:
        for got, want in zip(losses, ref_losses):
            assert abs(got.item() - want) <= TOL[dtype] * abs(want), (losses, ref_losses)
    return {"checked": checked, "last": stage.is_last, "losses": [float(x) for x in losses] if stage.is_last else None}


# grouped by world size: one pool of processes at a time
LAYOUTS = [
    (2, 1, 1, 1),
    (1, 2, 1, 1),
    (1, 1, 2, 1),
    (1, 1, 1, 2),
    (1, 4, 1, 1),
    (2, 2, 1, 1),
    (1, 2, 2, 1),
    (2, 1, 2, 1),
    (1, 2, 1, 2),
]


@pytest.mark.parametrize("tp, sp, pp, dp", LAYOUTS, ids=[f"tp{a}-sp{b}-pp{c}-dp{d}" for a, b, c, d in LAYOUTS])
def test_one_step_matches_single_process(dist_pool, tp, sp, pp, dp):
    res = dist_pool(tp * sp * pp * dp).run("tests.test_parallel:case_parallel", tp=tp, sp=sp, pp=pp, dp=dp)
    n_params = len(list(LinearLlama(ModelConfig(**MODEL)).parameters()))
    assert sum(r["checked"] for r in res) == n_params * tp * sp * dp
    assert any(r["last"] for r in res)


@pytest.mark.parametrize(
    "tp, sp, pp, dp, extra",
    [
        (1, 2, 2, 1, dict(microbatches=2, layout="contiguous")),
        (2, 1, 2, 1, dict(tie_embeddings=True, microbatches=2, loss_chunk_tokens=40)),  # 96 tokens: 40+40+16
        (2, 2, 1, 1, dict(dtype="f32", linear_variant="retention", feature_map="elu1")),
        (1, 2, 1, 2, dict(dtype="f32", linear_variant="basic", tie_embeddings=True)),
        (2, 2, 1, 1, dict(linear_variant="simple_gla")),
        (2, 2, 1, 1, dict(linear_variant="gla", layout="contiguous", sp_method={"linear": "auto", "softmax": "auto"})),
        (2, 2, 1, 1, dict(linear_variant="simple_gla", eos_id=0)),
        (1, 2, 2, 1, dict(microbatches=2, eos_id=0)),
        (2, 2, 1, 1, dict(linear_variant="gated_deltanet")),
        (
            1,
            2,
            2,
            1,
            dict(
                linear_variant="gated_deltanet",
                microbatches=2,
                layout="contiguous",
                sp_method={"linear": "allscan", "softmax": "ulysses"},
            ),
        ),
        (2, 2, 1, 1, dict(linear_variant="kda", eos_id=0, sp_method={"linear": "lasp1"})),
        (
            1,
            4,
            1,
            1,
            dict(linear_variant="deltanet", allow_neg_eigval=True, sp_method={"linear": "logscan", "softmax": "ring"}),
        ),
        # what an imported Qwen / Llama 3.1 brings: q/k/v biases, q/k norms, a larger head dim, llama3 RoPE
        (
            2,
            2,
            1,
            1,
            dict(
                attention_bias=True,
                qk_norm=True,
                attention_head_dim=24,
                rope_scaling="llama3",
                rope_original_max_positions=32,
                float32_norm_rope=True,
            ),
        ),
        (
            1,
            2,
            2,
            1,
            dict(
                attention_bias=True,
                qk_norm=True,
                layer_pattern="S",
                rope_scaling="llama3",
                rope_original_max_positions=32,
            ),
        ),
        # linearised layers: Hedgehog features, Liger's key gate, RoPE'd q and k, a softmax window
        (
            2,
            2,
            1,
            1,
            dict(
                feature_map="hedgehog",
                window=4,
                linear_variant="simple_gla",
                gate_source="key",
                linear_rope=True,
                output_norm=False,
                qk_norm=True,
                eos_id=0,
            ),
        ),
        (
            1,
            2,
            2,
            1,
            dict(feature_map="elu1", window=3, linear_variant="lightning", layout="contiguous", microbatches=2),
        ),
        # LoRA adapters inside the TP layers: column-parallel (q, v, up) and row-parallel (o, down)
        (
            2,
            2,
            1,
            1,
            dict(lora_rank=4, lora_targets="q_proj,v_proj,o_proj,up_proj,down_proj", lora_b=0.05, attention_bias=True),
        ),
        # mixtures of experts (lasp.parallel.ep): EP over DP, over SP (both layouts), with TP (experts whole
        # or split), with PP; the balancing and z-losses' gradients included
        (1, 1, 1, 2, dict(ep=2, moe=MOE)),
        (1, 2, 1, 1, dict(ep=2, moe=MOE)),
        (1, 2, 1, 1, dict(ep=2, moe=MOE, layout="contiguous", linear_variant="gated_deltanet", eos_id=0)),
        (2, 1, 1, 2, dict(ep=2, moe=MOE)),
        (2, 2, 1, 1, dict(ep=2, etp=2, moe={**MOE, "shared_ffn_hidden_size": 16, "top_k": 1})),
        (1, 1, 2, 2, dict(ep=2, moe={**MOE, "pattern": "DM"})),
        # the sigmoid router with the expert bias (auxiliary-loss-free), moved after each of 3 steps
        (
            1,
            2,
            1,
            1,
            dict(ep=2, steps=3, moe={**MOE, "router": "sigmoid", "expert_bias": True, "bias_update_rate": 0.05}),
        ),
        # Gated DeltaProduct (steps per token as rows of the core) and Mixture-of-Memories (memories as heads,
        # the router's gradient summed over TP): TP 2 x SP 2, documents, two combiners
        (2, 2, 1, 1, dict(linear_variant="deltaproduct", num_householder=3, eos_id=0)),
        (
            2,
            2,
            1,
            1,
            dict(
                linear_variant="gated_deltanet",
                mom_num_memories=3,
                mom_top_k=2,
                mom_shared_memory=True,
                eos_id=0,
                sp_method={"linear": "lasp1"},
            ),
        ),
        (2, 2, 1, 1, dict(linear_variant="gla", mom_num_memories=4, mom_top_k=3, layout="contiguous")),
        (1, 4, 1, 1, dict(linear_variant="deltaproduct", num_householder=2, sp_method={"linear": "logscan"})),
        (
            1,
            4,
            1,
            1,
            dict(
                linear_variant="gla", mom_num_memories=3, layout="contiguous", eos_id=0, sp_method={"linear": "allscan"}
            ),
        ),
    ],
    ids=[
        "1f1b-2mb-contiguous",
        "tied-tp-pp",
        "f32-retention",
        "f32-tied-dp",
        "simple-gla-tp-sp",
        "gla-tp-sp-auto",
        "documents-simple-gla-tp-sp",
        "documents-sp-pp-2mb",
        "gated-deltanet-tp-sp",
        "gated-deltanet-sp-pp-allscan-ulysses",
        "documents-kda-tp-sp-lasp1",
        "deltanet-neg-eigval-sp4-logscan-ring",
        "imported-features-tp-sp",
        "imported-softmax-sp-pp",
        "documents-window-hedgehog-tp-sp",
        "window-sp-pp-2mb",
        "lora-tp-sp",
        "moe-ep2-dp2",
        "moe-ep2-sp2",
        "moe-documents-ep2-sp2-contiguous",
        "moe-tp2-ep2",
        "moe-tp2-etp2-ep2-sp2",
        "moe-pp2-ep2",
        "moe-expert-bias-3-steps",
        "documents-deltaproduct-tp-sp",
        "documents-mom-gated-deltanet-shared-tp-sp-lasp1",
        "mom-gla-tp-sp-contiguous",
        "deltaproduct-sp4-logscan",
        "documents-mom-gla-sp4-contiguous-allscan",
    ],
)
def test_variants_match_single_process(dist_pool, tp, sp, pp, dp, extra):
    dist_pool(tp * sp * pp * dp).run("tests.test_parallel:case_parallel", tp=tp, sp=sp, pp=pp, dp=dp, **extra)


DEEP = [(3, False), (3, True), (4, False), (4, True)]


@pytest.mark.parametrize(
    "pp, tied",
    [  # pp3-untied also starts the 3-process pool: the slow tier's
        pytest.param(pp, t, id=f"pp{pp}-{'tied' if t else 'untied'}", marks=[pytest.mark.slow] if pp == 3 else [])
        for pp, t in DEEP
    ],
)
def test_deep_pipelines_match_single_process(dist_pool, pp, tied):
    # middle stages hold neither embedding nor head (megatron puts them in no embedding group); tied
    # embeddings are summed over the first and last stage only
    layers = {3: 6, 4: 4}[pp]
    res = dist_pool(pp).run(
        "tests.test_parallel:case_parallel",
        tp=1,
        sp=1,
        pp=pp,
        dp=1,
        num_layers=layers,
        tie_embeddings=tied,
        microbatches=2,
    )
    n_params = len(list(LinearLlama(ModelConfig(**{**MODEL, "num_layers": layers})).parameters()))
    assert sum(r["checked"] for r in res) == n_params  # tied: the one embedding is checked on two stages


def test_five_steps_follow_the_single_process_loss_curve(dist_pool):
    res = dist_pool(4).run("tests.test_parallel:case_parallel", tp=1, sp=2, pp=2, dp=1, steps=5, microbatches=2)
    curves = [r["losses"] for r in res if r["last"]]
    assert len(curves) == 2 and len(curves[0]) == 5 and curves[0][-1] < curves[0][0]


@pytest.mark.parametrize(
    "kwargs, world, seq, batch, parts",
    [
        (
            dict(tp=3),
            3,
            96,
            2,
            [
                "num_heads (4) is not divisible by parallel.tp (3)",
                "num_kv_heads (2) is not divisible by parallel.tp (3)",
            ],
        ),
        (dict(pp=3), 3, 96, 2, ["num_layers (4) is not divisible by parallel.pp (3)"]),
        (dict(sp=4, sp_layout="zigzag"), 4, 100, 2, ["sequence length 100", "multiple of 8"]),
        (dict(tp=2, dp=2), 8, 96, 2, ["world size 8 != tp x sp x pp x dp = 2 x 1 x 1 x 2 = 4"]),
        (
            dict(dp=2, microbatches=2),
            2,
            96,
            2,
            ["global batch 2 is not divisible by parallel.dp x parallel.microbatches"],
        ),
        (dict(loss_chunk_tokens=-1), 1, 96, 2, ["parallel.loss_chunk_tokens must be >= 0, got -1"]),
    ],
)
def test_bad_layouts_name_the_numbers(kwargs, world, seq, batch, parts):
    from lasp.parallel import ParallelConfig

    with pytest.raises(ValueError) as e:
        ParallelConfig(**kwargs).check(ModelConfig(**MODEL), world, seq, batch)
    assert all(p in str(e.value) for p in parts), str(e.value)


def _layout_problems(cfg, world=1, seq=SEQ, batch=BATCH) -> str:
    with pytest.raises(ValueError) as e:
        cfg.check(ModelConfig(**MODEL), world, seq, batch)
    return str(e.value)


@pytest.mark.parametrize(
    "value, shown", [("4", "str '4'"), (2.5, "float 2.5"), (True, "bool True")], ids=["str", "float", "bool"]
)
def test_a_size_of_another_type_is_named_with_its_value(value, shown):
    from lasp.parallel import ParallelConfig

    msg = _layout_problems(ParallelConfig(sp=value, sp_layout=3, dp_bucket_size="big"))
    for part in [
        f"parallel.sp: expected int or a list of int, got {shown}",
        "parallel.sp_layout: expected str, got int 3",
        "parallel.dp_bucket_size: expected int or null, got str 'big'",
    ]:
        assert part in msg, msg


@pytest.mark.parametrize("bad", [0, -1])
def test_a_size_below_one_does_not_stop_the_later_checks(bad):
    from lasp.parallel import ParallelConfig

    cfg = ParallelConfig(
        tp=bad, sp=bad, pp=3, dp=2, microbatches=bad, sp_layout="diagonal", loss_chunk_tokens=-1, zero_stage=5
    )
    msg = _layout_problems(cfg, world=4, batch=3)
    for part in [
        f"parallel.tp must be >= 1, got {bad}",
        f"parallel.sp must be >= 1, got {bad}",
        f"parallel.microbatches must be >= 1, got {bad}",
        "model.num_layers (4) is not divisible by parallel.pp (3)",
        "parallel.sp_layout must be one of contiguous, zigzag, got 'diagonal'",
        "parallel.loss_chunk_tokens must be >= 0, got -1",
        "parallel.zero_stage must be 0, 1, 2 or 3, got 5",
    ]:
        assert part in msg, msg
    assert "world size" not in msg and "global batch" not in msg  # they would divide or multiply by a bad size
    msg = _layout_problems(ParallelConfig(sp=bad, dp=2, microbatches=2), world=2, batch=3)
    assert f"parallel.sp must be >= 1, got {bad}" in msg and "global batch 3 is not divisible" in msg, msg


@pytest.mark.parametrize("seq, batch", [(0, 2), (-96, 2), (96, 0), (96, -2)])
def test_sequence_length_and_batch_must_be_positive(seq, batch):
    from lasp.parallel import ParallelConfig

    msg = _layout_problems(ParallelConfig(sp=2, tp=3), world=6, seq=seq, batch=batch)
    name, value = ("seq_len", seq) if seq < 1 else ("global_batch", batch)
    assert f"data.{name} must be >= 1, got {value}" in msg and "parallel.tp (3)" in msg, msg


def case_zero(stage, sp=1, dtype="f32"):
    import deepspeed.utils

    from lasp.parallel import (
        ParallelConfig,
        init_groups,
        local_microbatches,
        loss_sum_fn,
        parallelize,
        zero_engine,
        zero_train_step,
    )

    dt = {"f64": torch.float64, "f32": torch.float32}[dtype]
    cfg = ModelConfig(**MODEL)
    pcfg = ParallelConfig(sp=sp, dp=dist.get_world_size() // sp, zero_stage=stage)
    pcfg.check(cfg, dist.get_world_size(), SEQ, BATCH)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))
    ref, ref_losses = _reference(cfg, tokens, dt, 1, 1e-2)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    groups = init_groups(pcfg)
    torch.manual_seed(0)
    module = parallelize(LinearLlama(cfg).to(dt), pcfg, groups)
    engine = zero_engine(module, torch.optim.AdamW(module.parameters(), lr=1e-2), pcfg, groups, BATCH // pcfg.dp)
    names = {id(p): p.full_name for p in module.parameters()}

    def check(engine):
        for p in engine.module.parameters():
            assert_close_rel(deepspeed.utils.safe_get_full_grad(p), ref_grads[names[id(p)]], TOL[dtype], names[id(p)])

    mbs = local_microbatches(tokens, pcfg, groups)
    loss = zero_train_step(engine, mbs, loss_sum_fn(pcfg, groups, module), groups, check)
    assert abs(loss.item() - ref_losses[0]) <= TOL[dtype] * ref_losses[0], (loss.item(), ref_losses)
    return loss.item()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single_process(dist_pool, stage):
    dist_pool(2).run("tests.test_parallel:case_zero", stage=stage)


def test_zero_with_sequence_parallel(dist_pool):
    dist_pool(4).run("tests.test_parallel:case_zero", stage=2, sp=2)


def case_ep_comm():
    """One forward of a MoE hybrid at SP = 2 x EP = 2 under the profiler -> the all-to-alls per layer."""
    from lasp.distributed.events import profiled_ops
    from lasp.parallel import ParallelConfig, eval_step, init_groups, local_microbatches, parallelize

    cfg = ModelConfig(**{**MODEL, "moe": {**MOE, "pattern": "DM"}})
    pcfg = ParallelConfig(sp=2, ep=2)
    groups = init_groups(pcfg)
    torch.manual_seed(0)
    stage = parallelize(LinearLlama(cfg).double(), pcfg, groups)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))
    mbs = local_microbatches(tokens, pcfg, groups)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        eval_step(stage, mbs, pcfg, groups, tokens[:, 1:].numel())
    return [(op.name, op.input_shapes[0]) for op in profiled_ops(prof, "gloo:all_to_all")]


def test_expert_parallelism_sends_each_routed_token_once_each_way(dist_pool):
    # per MoE layer (2 of 4: "DM") megatron's dispatcher sends the rank's tokens once per chosen expert,
    # their router weights, and the expert outputs back: three all-to-alls, nothing else per layer
    local_rows = BATCH * SEQ // 2 * MOE["top_k"]
    for ops in dist_pool(2).run("tests.test_parallel:case_ep_comm"):
        assert len(ops) == 3 * 2, ops
        for layer in range(2):
            tokens, weights, back = (shape for _, shape in ops[3 * layer : 3 * layer + 3])
            assert tokens == [local_rows, MODEL["hidden_size"]] and weights == [local_rows]
            assert back[1] == MODEL["hidden_size"]  # the rows this rank's experts received
