"""Data parallelism with the gradient all-reduce overlapped with the backward (megatron-core DDP), and the
trainer's API on top of it: forward_backward_step, eval_step, clip_grad_norm_, all against one process."""

import pytest
import torch
import torch.distributed as dist

from lasp.distributed.events import profiled_ops
from lasp.model import LinearLlama, ModelConfig
from tests.dist import assert_close_rel
from tests.test_parallel import BATCH, MODEL, MOE, SEQ, TOL, _reference


def _build(tp, sp, pp, dp, microbatches=1, dp_bucket_size=None, batch=BATCH, ep=1, **model_kw):
    """(model config, parallel config, groups, this rank's stage, tokens [batch, N+1]) in float64."""
    from lasp.parallel import ParallelConfig, init_groups, parallelize

    cfg = ModelConfig(**{**MODEL, **model_kw})
    pcfg = ParallelConfig(tp=tp, sp=sp, pp=pp, dp=dp, microbatches=microbatches, dp_bucket_size=dp_bucket_size, ep=ep)
    pcfg.check(cfg, dist.get_world_size(), SEQ, batch)
    groups = init_groups(pcfg)
    torch.manual_seed(0)
    stage = parallelize(LinearLlama(cfg).double(), pcfg, groups)
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ + 1), generator=torch.Generator().manual_seed(7))
    return cfg, pcfg, groups, stage, tokens


def _want(ref_grads: dict, p, tp_rank: int, tp: int) -> torch.Tensor:
    want = ref_grads[p.full_name]
    return want.chunk(tp, dim=p.tp_dim)[tp_rank] if getattr(p, "tp_dim", None) is not None else want


def case_overlap(bucket: int):
    """Step 2 under the profiler (step 1 teaches megatron how many gradients each bucket waits for):
    returns the bucket count, the number of bucket all-reduces and how many started before the backward
    of the first layer had finished (a marker recorded when the gradient of its input arrives)."""
    from lasp.parallel import train_step

    *_, pcfg, groups, stage, tokens = _build(1, 1, 1, 2, dp_bucket_size=bucket)
    train_step(stage, tokens, pcfg, groups)

    def mark_input(module, args):
        def done(grad):
            with torch.profiler.record_function("first_layer_backward_done"):
                return None

        args[0].register_hook(done)

    handle = stage.layers[0].register_forward_pre_hook(mark_input)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(stage, tokens, pcfg, groups)
    handle.remove()
    events = profiled_ops(prof)
    (done,) = [e.start_ns for e in events if e.name == "first_layer_backward_done"]
    # megatron issues each bucket as one coalesced all-reduce; the loss all-reduce is a plain one
    reduces = [e.start_ns for e in events if e.name == "c10d::allreduce_coalesced_"]
    return {"buckets": len(stage.bucket_groups), "reduces": len(reduces), "early": sum(t < done for t in reduces)}


def test_grad_reduce_overlaps_the_backward(dist_pool):
    res = dist_pool(2).run("tests.test_dp:case_overlap", bucket=20_000)
    for r in res:
        assert r["buckets"] > 2, r
        assert r["reduces"] == r["buckets"], r
        # every bucket but the one holding the embedding is on the wire before layer 0's backward is done
        assert r["early"] == r["buckets"] - 1, r


def case_steps(tp, sp, pp, dp, microbatches, bucket, steps=3, lr=1e-2):
    """`steps` AdamW steps with small buckets (overlapped from step 2): the loss on every rank follows
    one process and the last step's gradients equal its gradients."""
    from lasp.parallel import train_step

    cfg, pcfg, groups, stage, tokens = _build(tp, sp, pp, dp, microbatches, bucket, batch=dp * microbatches)
    ref, ref_losses = _reference(cfg, tokens, torch.float64, steps, lr)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    opt = torch.optim.AdamW(stage.parameters(), lr=lr)
    for want in ref_losses:
        opt.zero_grad()
        loss = train_step(stage, tokens, pcfg, groups)
        assert loss.dtype == torch.float64 and loss.dim() == 0
        assert abs(loss.item() - want) <= TOL["f64"] * want, (loss.item(), want)
        opt.step()
    for p in stage.parameters():
        assert_close_rel(p.grad, _want(ref_grads, p, groups.tp_rank, tp), TOL["f64"], p.full_name)
    return len(stage.bucket_groups)


STEP_LAYOUTS = [(1, 1, 2, 2, 2), (2, 1, 1, 2, 1), (1, 2, 1, 2, 2)]


@pytest.mark.parametrize(
    "tp, sp, pp, dp, mb", STEP_LAYOUTS, ids=[f"tp{a}-sp{b}-pp{c}-dp{d}-mb{e}" for a, b, c, d, e in STEP_LAYOUTS]
)
def test_overlapped_steps_match_single_process(dist_pool, tp, sp, pp, dp, mb):
    buckets = dist_pool(tp * sp * pp * dp).run(
        "tests.test_dp:case_steps", tp=tp, sp=sp, pp=pp, dp=dp, microbatches=mb, bucket=20_000
    )
    assert max(buckets) > 1


def case_eval(tp, sp, pp, dp, microbatches):
    """eval_step and forward_backward_step return the global mean loss on every rank; eval leaves the
    gradients alone."""
    from lasp.parallel import eval_step, forward_backward_step, local_microbatches

    cfg, pcfg, groups, stage, tokens = _build(tp, sp, pp, dp, microbatches)
    _, (want,) = _reference(cfg, tokens, torch.float64, 1, 0.0)
    mbs, total = local_microbatches(tokens, pcfg, groups), tokens[:, 1:].numel()
    evaluated = eval_step(stage, mbs, pcfg, groups, total)
    assert all(p.grad is None for p in stage.parameters())
    trained = forward_backward_step(stage, mbs, pcfg, groups, total)
    grads = [p.grad.clone() for p in stage.parameters()]
    again = eval_step(stage, mbs, pcfg, groups, total)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, stage.parameters()))
    for loss in (evaluated, trained, again):
        assert loss.dtype == torch.float64 and loss.dim() == 0
        assert abs(loss.item() - want) <= TOL["f64"] * want, (loss.item(), want)
    return [evaluated.item(), trained.item()]


def test_eval_and_forward_backward_step_return_the_global_loss_everywhere(dist_pool):
    res = dist_pool(4).run("tests.test_dp:case_eval", tp=1, sp=2, pp=2, dp=1, microbatches=2)
    assert len({tuple(r) for r in res}) == 1, res


def case_clip(tp, sp, pp, dp, **model_kw):
    """The norm (max_norm 0: measured only) and the clipped gradients equal one process's
    torch.nn.utils.clip_grad_norm_."""
    from lasp.parallel import clip_grad_norm_, train_step

    cfg, pcfg, groups, stage, tokens = _build(tp, sp, pp, dp, **model_kw)
    ref, _ = _reference(cfg, tokens, torch.float64, 1, 0.0, parts=dp)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
    train_step(stage, tokens, pcfg, groups)
    grads = [p.grad.clone() for p in stage.parameters()]
    norm = clip_grad_norm_(stage, groups, 0.0)
    assert abs(norm.item() - ref_norm) <= TOL["f64"] * ref_norm, (norm.item(), ref_norm)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, stage.parameters()))

    max_norm = 0.5 * ref_norm
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    norm = clip_grad_norm_(stage, groups, max_norm)
    assert abs(norm.item() - ref_norm) <= TOL["f64"] * ref_norm, (norm.item(), ref_norm)
    for p in stage.parameters():
        assert_close_rel(p.grad, _want(ref_grads, p, groups.tp_rank, tp), TOL["f64"], p.full_name)
    return norm.item()


CLIP_LAYOUTS = [
    (2, 1, 1, 1, {}),
    (1, 1, 2, 1, {}),
    (1, 2, 1, 1, {}),
    (1, 1, 1, 2, {}),
    (2, 1, 2, 1, dict(tie_embeddings=True)),
    # experts differ between EP ranks (summed over EP), and are whole on both TP ranks (counted once)
    (2, 1, 1, 2, dict(ep=2, moe=MOE)),
]


@pytest.mark.parametrize(
    "tp, sp, pp, dp, extra", CLIP_LAYOUTS, ids=["tp2", "pp2", "sp2", "dp2", "tp2-pp2-tied", "moe-tp2-ep2"]
)
def test_clip_grad_norm_matches_single_process(dist_pool, tp, sp, pp, dp, extra):
    norms = dist_pool(tp * sp * pp * dp).run("tests.test_dp:case_clip", tp=tp, sp=sp, pp=pp, dp=dp, **extra)
    assert len(set(norms)) == 1, norms  # the same value on every rank
