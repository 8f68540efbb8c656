"""A rank whose labels are all ignored still runs every layer's backward collective: the step neither
hangs nor errs, and every gradient equals one process on the same masked labels."""

import pytest
import torch
import torch.distributed as dist

from lasp.model import LinearLlama, ModelConfig, lm_loss_sum
from lasp.sp.layout import shard_sequence
from tests.dist import assert_close_rel

MODEL = dict(
    vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, layer_pattern="LS"
)
SEQ, BATCH = 32, 2


def case_ignored_rank(layout: str, ignored_rank: int) -> int:
    from lasp.parallel import ParallelConfig, forward_backward_step, init_groups, local_microbatches, parallelize

    W = dist.get_world_size()
    cfg = ModelConfig(**MODEL)
    pcfg = ParallelConfig(sp=W, sp_layout=layout)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    labels = tokens[:, 1:].clone()
    owner = torch.cat(
        [torch.full_like(shard_sequence(labels, rank=r, world_size=W, layout=layout), r) for r in range(W)], dim=1
    )  # rank-major
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for r in range(W):  # the positions rank `ignored_rank` holds
        pos = shard_sequence(torch.arange(SEQ).expand(BATCH, SEQ), rank=r, world_size=W, layout=layout)
        if r == ignored_rank:
            mask.scatter_(1, pos, True)
    assert owner.numel() == labels.numel()
    labels[mask] = -100

    torch.manual_seed(0)
    ref = LinearLlama(cfg).to(torch.float64)
    (lm_loss_sum(ref(tokens[:, :-1]), labels) / labels.numel()).backward()

    groups = init_groups(pcfg)
    torch.manual_seed(0)
    stage = parallelize(LinearLlama(cfg).to(torch.float64), pcfg, groups)
    mbs = local_microbatches(tokens, pcfg, groups)
    mine = shard_sequence(labels, rank=groups.sp_rank, world_size=W, layout=layout)
    assert (mine == -100).all() == (groups.sp_rank == ignored_rank)
    for mb in mbs:
        mb["labels"] = mine
    forward_backward_step(stage, mbs, pcfg, groups, labels.numel())
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for p in stage.parameters():
        assert_close_rel(p.grad, grads[p.full_name], 1e-10, p.full_name)
    return len(grads)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_a_rank_with_only_ignored_labels_trains_without_hanging(dist_pool, layout):
    # contiguous: the last rank (its tokens feed no later rank's loss); zigzag: rank 0
    ignored = 1 if layout == "contiguous" else 0
    assert all(
        n > 0
        for n in dist_pool(2).run("tests.test_ignored_rank:case_ignored_rank", layout=layout, ignored_rank=ignored)
    )
