"""Chunked LM head + cross-entropy: equal to the plain logits loss (one device and vocab-parallel over TP
gloo ranks), and far smaller at its peak."""

import pytest
import torch
import torch.distributed as dist

from lasp.model import chunked_lm_loss_sum, lm_loss_sum
from tests.dist import assert_close_rel, c10d_ops

D, V = 24, 40


def _inputs(B, T, dtype, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, T), generator=gen)
    if ignore:
        labels[0, ::3] = -100
        labels[-1, -2:] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def _loss_and_grads(fn, hidden, weight, labels, upstream=0.7):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * upstream).backward()  # an upstream gradient other than 1 (the schedules divide by the tokens)
    return loss.detach(), h.grad, w.grad


def _plain(h, w, labels):
    return lm_loss_sum(h @ w.T, labels)


@pytest.mark.parametrize(
    "B, T, chunk",
    [(2, 37, 8), (1, 37, 5), (2, 37, 0), (2, 37, 100), (3, 16, 16), (1, 1, 4)],
    ids=["odd-T", "many-chunks", "whole", "chunk-beyond-T", "exact-chunks", "one-token"],
)
def test_chunked_equals_plain_f64(B, T, chunk):
    hidden, weight, labels = _inputs(B, T, torch.float64, ignore=B * T > 1)
    got = _loss_and_grads(lambda h, w, y: chunked_lm_loss_sum(h, w, y, chunk_tokens=chunk), hidden, weight, labels)
    want = _loss_and_grads(_plain, hidden, weight, labels)
    assert got[0].dtype == torch.float64
    for g, x, what in zip(got, want, ("loss", "dhidden", "dweight")):
        assert_close_rel(g, x, 1e-10, what)


@pytest.mark.parametrize("chunk", [8, 0, 5])
def test_chunked_kl_to_a_teacher_equals_plain_f64(chunk):
    """Distillation's KL(teacher || model), chunked: equal to the plain one from the logits; the teacher
    gets no gradient, ignored labels count nothing."""
    from lasp.model.loss import chunked_kl_sum

    hidden, weight, labels = _inputs(2, 37, torch.float64)
    teacher = torch.randn(2, 37, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def plain(h, w, y):
        kl = torch.nn.functional.kl_div(
            (h @ w.T).log_softmax(-1), (teacher @ w.detach().T).log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        return kl[y != -100].sum()

    got = _loss_and_grads(lambda h, w, y: chunked_kl_sum(h, teacher, w, y, chunk_tokens=chunk), hidden, weight, labels)
    want = _loss_and_grads(plain, hidden, weight, labels)
    for g, x, what in zip(got, want, ("kl", "dhidden", "dweight")):
        assert_close_rel(g, x, 1e-10, what)


def test_all_ignored_gives_zero_loss_and_gradients():
    hidden, weight, labels = _inputs(2, 9, torch.float64)
    labels[:] = -100
    loss, dh, dw = _loss_and_grads(lambda h, w, y: chunked_lm_loss_sum(h, w, y, chunk_tokens=4), hidden, weight, labels)
    assert loss.item() == 0 and not dh.any() and not dw.any()


def test_bf16_inputs_close_to_float32():
    hidden, weight, labels = _inputs(2, 33, torch.bfloat16)
    got = _loss_and_grads(lambda h, w, y: chunked_lm_loss_sum(h, w, y, chunk_tokens=8), hidden, weight, labels)
    want = _loss_and_grads(_plain, hidden.float(), weight.float(), labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    assert_close_rel(got[0], want[0], 1e-5, "loss")  # fp32 math on the exact bf16 values
    assert_close_rel(got[1].float(), want[1], 1e-2, "dhidden")  # rounded to bf16
    assert_close_rel(got[2].float(), want[2], 1e-2, "dweight")


@pytest.mark.parametrize("tie", [False, True])
def test_model_hidden_states_feed_the_chunked_loss(tie):
    from lasp.model import LinearLlama, ModelConfig

    torch.manual_seed(0)
    model = LinearLlama(ModelConfig(num_layers=2, tie_embeddings=tie)).double()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20))
    grads = []
    for fn in (
        lambda x, y: lm_loss_sum(model(x), y),
        lambda x, y: chunked_lm_loss_sum(model.hidden_states(x), model.lm_head.weight, y, chunk_tokens=7),
    ):
        model.zero_grad()
        loss = fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for i, (g, x) in enumerate(zip(*grads)):
        assert_close_rel(g, x, 1e-10, f"loss/grad {i}")


def test_negative_chunk_is_an_error():
    hidden, weight, labels = _inputs(1, 4, torch.float64)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        chunked_lm_loss_sum(hidden, weight, labels, chunk_tokens=-1)


def test_peak_memory_far_below_plain():
    from lasp.bench.loss_memory import loss_peak_memory

    r = loss_peak_memory(tokens=2048, vocab=4096, hidden=64, chunk_tokens=256)
    logits_bytes = 2048 * 4096 * 4
    assert r["plain_bytes"] >= 2 * logits_bytes, r  # the plain loss holds the logits and more
    assert r["chunked_bytes"] < logits_bytes / 2 and r["ratio"] < 0.25, r


def test_fake_tensor_peak_agrees_with_measured():
    """The fake-tensor tracker (used where the plain run would not fit) against the profiler, both paths."""
    from lasp.bench.loss_memory import FAKE, MEASURED, loss_peak_memory, validate

    v = validate(tokens=2048, vocab=4096, hidden=64, chunk_tokens=256)
    for path in ("plain", "chunked"):
        assert abs(v[f"{path}_rel_diff"]) < 0.1, v
    assert v["plain_measured_bytes"] >= 3 * 2048 * 4096 * 4, v  # not two zeros agreeing
    r = loss_peak_memory(tokens=2048, vocab=4096, hidden=64, chunk_tokens=256, method="fake")
    assert r["plain_method"] == r["chunked_method"] == FAKE and r["plain_bytes"] == v["plain_fake_bytes"], r
    assert loss_peak_memory(tokens=64, vocab=128, hidden=8, chunk_tokens=16)["plain_method"] == MEASURED


def case_vocab_parallel(chunk, dtype="f64"):
    from lasp.parallel.loss import vocab_parallel_chunked_loss_sum

    dt = {"f64": torch.float64, "f32": torch.float32}[dtype]
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, labels = _inputs(2, 37, dt)
    want = _loss_and_grads(_plain, hidden, weight, labels)
    shard = weight.chunk(world, dim=0)[rank]
    fn = lambda h, w, y: vocab_parallel_chunked_loss_sum(  # noqa: E731
        h, w, y, chunk_tokens=chunk, group=dist.group.WORLD, rank=rank
    )
    with torch.profiler.profile() as prof:
        got = _loss_and_grads(fn, hidden, shard, labels)
    tol = 1e-10 if dtype == "f64" else 1e-5
    assert_close_rel(got[0], want[0], tol, "loss")
    assert_close_rel(got[1], want[1], tol, "dhidden")  # summed over the vocabulary shards
    assert_close_rel(got[2], want[2].chunk(world, dim=0)[rank], tol, "dweight shard")
    return c10d_ops(prof)


@pytest.mark.parametrize("chunk, dtype", [(8, "f64"), (0, "f64"), (5, "f32")])
def test_vocab_parallel_equals_one_device(dist_pool, chunk, dtype):
    ops = dist_pool(2).run("tests.test_loss:case_vocab_parallel", chunk=chunk, dtype=dtype)
    # max + sum in the forward, the dhidden sum in the backward: per call, however many chunks
    assert all(o.count("c10d::allreduce_") == 3 and len(o) == 3 for o in ops), ops


def test_autocast_keeps_the_chunked_loss_in_float32():
    """Under bf16 autocast (the trainer's mixed precision) the head's matmuls stay float32."""
    from lasp.model import chunked_lm_loss_sum

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 50, (2, 37), generator=gen)
    want = chunked_lm_loss_sum(h, w, y, chunk_tokens=8)
    dh, dw = torch.autograd.grad(want, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_lm_loss_sum(h, w, y, chunk_tokens=8)
    assert got.dtype == torch.float32
    gh, gw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, dh, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, dw, rtol=1e-6, atol=1e-7)
