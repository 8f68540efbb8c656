import pytest
import torch

from lasp import SeqLayout, shard_sequence, unshard_sequence
from lasp.sp.layout import merge_local_chunks, split_local_chunks


def test_zigzag_chunks_and_gather_order():
    lay = SeqLayout("zigzag", 3)
    assert [lay.chunks_of(r) for r in range(3)] == [(0, 5), (1, 4), (2, 3)]
    assert [lay.owner(c) for c in range(6)] == [0, 1, 2, 2, 1, 0]
    # rank-major gather holds chunks [0, 5, 1, 4, 2, 3]; global order must undo it
    assert lay.gather_index() == [0, 2, 4, 5, 3, 1]
    assert SeqLayout("contiguous", 3).gather_index() == [0, 1, 2]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_shard_roundtrip(layout, W):
    n = 2 * W * 5
    x = torch.arange(2 * n).view(2, n)
    shards = [shard_sequence(x, rank=r, world_size=W, layout=layout) for r in range(W)]
    assert all(s.shape == (2, n // W) for s in shards)
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    if layout == "zigzag" and W == 2:
        assert shards[0][0].tolist() == list(range(0, 5)) + list(range(15, 20))


def test_shard_other_dim_and_local_chunks():
    x = torch.randn(3, 12, 2, 4)
    s = shard_sequence(x, rank=1, world_size=3, layout="zigzag", dim=1)
    assert torch.equal(s, torch.cat([x[:, 2:4], x[:, 8:10]], dim=1))
    assert torch.equal(merge_local_chunks(split_local_chunks(s, 2), 2), s)
    assert torch.equal(split_local_chunks(s, 2)[3:], x[:, 8:10])


@pytest.mark.parametrize(
    "n, W, layout, match",
    [(10, 4, "contiguous", "length 10 .*contiguous.* 4 ranks.*multiple of 4"), (12, 4, "zigzag", "multiple of 8")],
)
def test_bad_lengths_are_clear_errors(n, W, layout, match):
    with pytest.raises(ValueError, match=match):
        shard_sequence(torch.zeros(1, n), rank=0, world_size=W, layout=layout)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        SeqLayout("ring", 2)


def test_take_chunks_is_indexing_without_an_index_tensor():
    from lasp.sp.layout import take_chunks

    x = torch.randn(6, 2, 3)
    assert take_chunks(x, range(6)) is x
    for index in ([5, 0, 4, 1, 3, 2], (2,), [1, 1]):
        assert torch.equal(take_chunks(x, index), x[list(index)])
