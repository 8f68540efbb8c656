"""Halos across ranks (lasp.sp.halo): the rows before each local chunk that a short convolution (the delta
rule's layers) or a softmax window (a linearised layer) reaches back for come from the previous chunk's
owner, one all-gather each way, and a window layer under LASP-2 equals one process in float64."""

import pytest
import torch
import torch.distributed as dist

from lasp import SeqLayout, lasp2_linear_attn, shard_sequence
from tests.dist import assert_close_rel, comm_events, profiled_steady_step


def case_halo(layout, L=5, rows=3, B=2, C=4):
    """halo_rows: each local chunk gets the rows before it in the global sequence (zeros at the start), and
    the gradients reach their owners; one all-gather of the chunks' last rows each way, nothing else."""
    from lasp.sp.halo import halo_rows

    rank, W = dist.get_rank(), dist.get_world_size()
    lay = SeqLayout(layout, W)
    N = L * lay.num_chunks
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dh = torch.randn(lay.num_chunks, B, rows, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # the reference on the whole sequence: chunk c's halo is x[:, cL - rows : cL]
    full = x.clone().requires_grad_()
    pad = torch.cat([torch.zeros(B, rows, C, dtype=torch.float64), full], dim=1)
    want = torch.stack([pad[:, c * L : c * L + rows] for c in range(lay.num_chunks)])
    (want * dh).sum().backward()
    mine = list(lay.chunks_of(rank))
    local = shard_sequence(x, rank=rank, world_size=W, layout=layout).requires_grad_()
    run = lambda: halo_rows(local, rows, layout=layout)  # noqa: E731
    got, pf, pb = profiled_steady_step(run, dh[mine])
    assert_close_rel(got, want[mine].detach(), 1e-15, "halo")
    assert_close_rel(local.grad, shard_sequence(full.grad, rank=rank, world_size=W, layout=layout), 1e-15, "dx")
    return {"fwd": comm_events(pf), "bwd": comm_events(pb)}


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [2, 3])
def test_the_convolution_halo_comes_from_the_previous_chunk(dist_pool, W, layout):
    n = SeqLayout(layout, W).chunks_per_rank
    for r in dist_pool(W).run("tests.test_sp_halo:case_halo", layout=layout):
        assert r["fwd"] == r["bwd"] == [("gloo:all_gather", [[n, 2, 3, 4]])], r  # n chunks x B x rows x C


def case_window_layer(layout, window, variant, feature_map, chunk_len=7, B=2, hidden=32):
    """A linearised layer with a softmax window (lasp.model.window) under LASP-2: its output and the
    gradients of its input and parameters equal one process; the window adds one halo all-gather each way."""
    from functools import partial

    from lasp.model import ModelConfig
    from lasp.model.llama import LinearAttention
    from lasp.sp.halo import halo_rows

    rank, W = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(
        hidden_size=hidden,
        num_heads=4,
        num_kv_heads=2,
        linear_variant=variant,
        window=window,
        feature_map=feature_map,
        linear_rope=True,
        output_norm=False,
        gate_source="key" if variant == "simple_gla" else "projection",
    )
    torch.manual_seed(0)
    m = LinearAttention(cfg, 1).double()
    N = chunk_len * SeqLayout(layout, W).num_chunks
    gen = torch.Generator().manual_seed(5)
    x, dy = (torch.randn(B, N, hidden, generator=gen, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(N).expand(B, N)
    full = x.clone().requires_grad_()
    y_ref = m(full, pos)
    y_ref.backward(dy)
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    shard = lambda t: shard_sequence(t, rank=rank, world_size=W, layout=layout)  # noqa: E731
    m.attn_fn = partial(lasp2_linear_attn, layout=layout)
    m.halo_fn = partial(halo_rows, layout=layout)
    local = shard(x).requires_grad_()
    y, pf, pb = profiled_steady_step(lambda: m(local, shard(pos)), shard(dy))
    assert_close_rel(y, shard(y_ref).detach(), 1e-10, "y")
    assert_close_rel(local.grad, shard(full.grad), 1e-10, "dx")
    for n, p in m.named_parameters():
        dist.all_reduce(p.grad)
        assert_close_rel(p.grad, ref[n], 1e-10, f"d{n}")
    channels = 2 * (2 * 8) + 2 * (16 if feature_map == "hedgehog" else 8) + (4 if variant == "simple_gla" else 0)
    return {"fwd": comm_events(pf), "bwd": comm_events(pb), "channels": channels}


WINDOWS = [  # ranks, window, layout, the linear form (a gate pooled from the key, or a constant decay)
    (1, 1, "zigzag", "simple_gla", "hedgehog"),
    (2, 2, "contiguous", "lightning", "elu1"),
    (2, 3, "zigzag", "simple_gla", "hedgehog"),
    (3, 4, "contiguous", "simple_gla", "hedgehog"),
    (4, 4, "zigzag", "lightning", "elu1"),
    (4, 2, "contiguous", "simple_gla", "hedgehog"),
]


@pytest.mark.parametrize(
    "W, window, layout, variant, feature_map", WINDOWS, ids=[f"W{w}-window{n}-{lay}-{v}" for w, n, lay, v, _ in WINDOWS]
)
def test_a_window_layer_matches_one_process_with_a_halo(dist_pool, W, window, layout, variant, feature_map):
    n = SeqLayout(layout, W).chunks_per_rank
    for r in dist_pool(W).run(
        "tests.test_sp_halo:case_window_layer", layout=layout, window=window, variant=variant, feature_map=feature_map
    ):
        halo = [("gloo:all_gather", [[n, 2, window - 1, r["channels"]]])] if W > 1 and window > 1 else []
        for events in (r["fwd"], r["bwd"]):  # LASP-2's one packed all-gather, and the window's halo
            rest = [e for e in events if e not in halo]
            assert len(events) == len(halo) + len(rest), events
            assert [e[0] for e in rest] == ["gloo:all_gather"] * (W > 1), events
            assert all(len(shape) == 1 for e in rest for shape in e[1]), events  # packed bytes, not the sequence
