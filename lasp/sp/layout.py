"""Sequence layouts: which global chunks each rank of a sequence-parallel group holds, and in what order.

This is the one place layouts are defined (docs/design.md, "Layouts"):
- `contiguous`: W chunks, rank r holds chunk r.
- `zigzag`: 2W chunks, rank r holds chunk r followed by chunk 2W-1-r (balanced causal softmax work).
All chunks have the same length. The data loader splits tokens once with `shard_sequence`; every layer
then works on the same split.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class SeqLayout:
    """A layout over a group of `world_size` ranks."""

    kind: str
    """`contiguous` or `zigzag`."""
    world_size: int
    """Ranks in the sequence-parallel group."""

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"unknown layout {self.kind!r}; expected one of {', '.join(LAYOUTS)}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")

    @property
    def chunks_per_rank(self) -> int:
        return 1 if self.kind == "contiguous" else 2

    @property
    def num_chunks(self) -> int:
        return self.world_size * self.chunks_per_rank

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """Global chunk ids held by `rank`, in the order they sit in its local tensor."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a group of {self.world_size}")
        if self.kind == "contiguous":
            return (rank,)
        return (rank, 2 * self.world_size - 1 - rank)

    def owner(self, chunk: int) -> int:
        """The rank that holds global chunk `chunk`."""
        if self.kind == "contiguous":
            return chunk
        return chunk if chunk < self.world_size else 2 * self.world_size - 1 - chunk

    def gather_index(self) -> list[int]:
        """For each global chunk, its position in a rank-major gather of every rank's local chunks."""
        pos = {c: r * self.chunks_per_rank + i for r in range(self.world_size) for i, c in enumerate(self.chunks_of(r))}
        return [pos[c] for c in range(self.num_chunks)]

    def rank_major_chunks(self) -> list[int]:
        """Global chunk ids in the order of a rank-major gather of every rank's local chunks."""
        return [c for r in range(self.world_size) for c in self.chunks_of(r)]

    def check_global_length(self, n: int) -> int:
        """Raise unless a sequence of n tokens splits evenly; return the chunk length."""
        if n < self.num_chunks or n % self.num_chunks:
            raise ValueError(
                f"sequence length {n} cannot be split by the {self.kind} layout over {self.world_size} "
                f"ranks: it needs a positive multiple of {self.num_chunks} tokens"
            )
        return n // self.num_chunks

    def check_local_length(self, t: int) -> int:
        """Raise unless a rank's local length t is whole chunks; return the chunk length."""
        if t < self.chunks_per_rank or t % self.chunks_per_rank:
            raise ValueError(
                f"local length {t} (sequence length {t * self.world_size}) cannot be split by the "
                f"{self.kind} layout over {self.world_size} ranks: each rank holds "
                f"{self.chunks_per_rank} equal chunks"
            )
        return t // self.chunks_per_rank


def shard_sequence(x: Tensor, *, rank: int, world_size: int, layout: str, dim: int = 1) -> Tensor:
    """The part of the full sequence x (length along `dim`) that `rank` holds under `layout`."""
    lay = SeqLayout(layout, world_size)
    chunk = lay.check_global_length(x.shape[dim])
    parts = [x.narrow(dim, c * chunk, chunk) for c in lay.chunks_of(rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(shards: list[Tensor] | tuple[Tensor, ...], *, layout: str, dim: int = 1) -> Tensor:
    """Inverse of `shard_sequence`: the full sequence from every rank's shard, in rank order."""
    lengths = {s.shape[dim] for s in shards}
    if len(lengths) != 1:
        raise ValueError(f"shards must all have the same length along dim {dim}, got {sorted(lengths)}")
    lay = SeqLayout(layout, len(shards))
    lay.check_local_length(lengths.pop())
    stacked = torch.stack([s.movedim(dim, 0) for s in shards])  # [W, T, ...]
    return stacked_to_global(stacked.unsqueeze(1), lay).squeeze(0).movedim(0, dim)


def take_chunks(x: Tensor, index) -> Tensor:
    """x[index] along dim 0 for a short list of ints, as views and one copy: indexing a CUDA tensor with a
    Python list copies the list to the GPU, which stalls the host until the queued kernels finish."""
    index = list(index)
    if index == list(range(x.shape[0])):
        return x
    return torch.stack([x[i] for i in index])


def stacked_to_global(x_WBT: Tensor, lay: SeqLayout) -> Tensor:
    """Every rank's local tensor stacked in rank order, [W, B, T, ...] -> the full sequence [B, W*T, ...]."""
    W, B, T = x_WBT.shape[:3]
    n, rest = lay.chunks_per_rank, x_WBT.shape[3:]
    L = T // n
    chunks = x_WBT.reshape(W, B, n, L, *rest).transpose(1, 2).reshape(W * n, B, L, *rest)
    chunks = take_chunks(chunks, lay.gather_index())
    return chunks.transpose(0, 1).reshape(B, W * T, *rest)


def global_to_stacked(x_BN: Tensor, lay: SeqLayout) -> Tensor:
    """Inverse of `stacked_to_global`: [B, N, ...] -> every rank's local tensor in rank order [W, B, N/W, ...]."""
    B, N = x_BN.shape[:2]
    W, n, rest = lay.world_size, lay.chunks_per_rank, x_BN.shape[2:]
    L = N // lay.num_chunks
    chunks = x_BN.reshape(B, lay.num_chunks, L, *rest).transpose(0, 1)
    chunks = take_chunks(chunks, lay.rank_major_chunks())
    return chunks.reshape(W, n, B, L, *rest).transpose(1, 2).reshape(W, B, n * L, *rest)


def split_local_chunks(x_BTHD: Tensor, n: int) -> Tensor:
    """A rank's local [B, n*L, H, D] as its n chunks stacked chunk-major on the batch dim: [n*B, L, H, D]."""
    if n == 1:
        return x_BTHD
    B, T, H, D = x_BTHD.shape
    return x_BTHD.view(B, n, T // n, H, D).transpose(0, 1).reshape(n * B, T // n, H, D)


def merge_local_chunks(x_nBLHD: Tensor, n: int) -> Tensor:
    """Inverse of `split_local_chunks`: [n*B, L, H, D] -> [B, n*L, H, D]."""
    if n == 1:
        return x_nBLHD
    nB, L, H, D = x_nBLHD.shape
    return x_nBLHD.view(n, nB // n, L, H, D).transpose(0, 1).reshape(nB // n, n * L, H, D)
