"""Packed documents: where each document of a row starts, as every attention op takes it (`cu_seqlens`).

Legend: B batch rows, N tokens per row (the GLOBAL length under sequence parallelism).

`cu_seqlens` follows flash-attention's convention, the cumulative document lengths of a row:
[0, l1, l1 + l2, ..., N]. One list serves a batch of one row; a batch of B rows takes B lists (their
documents differ). A document start resets a linear layer's state (the token at the start is the first
one the new state holds) and stops softmax attention across documents. The state entering the sequence
(`initial_state`) belongs to its first document.

Ops take the raw lists or a `Documents` built once (the trainer builds one per batch and every layer
reuses it; the derived tensors are cached).
"""

import bisect
from collections.abc import Sequence

import torch
from torch import Tensor


def _problems(starts: tuple[tuple[int, ...], ...], length: int) -> list[str]:
    problems = []
    for b, row in enumerate(starts):
        if not row or row[0] != 0:
            problems.append(f"row {b}: cu_seqlens must start at 0, got {list(row[:4])}")
        bad = [(x, y) for x, y in zip(row, row[1:]) if y <= x]
        if bad:
            problems.append(
                f"row {b}: cu_seqlens must be strictly increasing (no empty document), got "
                f"{', '.join(f'{x} then {y}' for x, y in bad[:4])}"
            )
        if row and row[-1] >= length:
            problems.append(f"row {b}: a document starts at {row[-1]}, at or past the end of {length} tokens")
    return problems


class Documents:
    """The documents of B rows of N tokens: `starts[b]` are row b's document starts, 0 first, ascending."""

    def __init__(self, starts: Sequence[Sequence[int]], length: int):
        self.starts = tuple(tuple(int(s) for s in row) for row in starts)
        self.length = int(length)
        self._cache: dict = {}
        problems = _problems(self.starts, self.length)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def batch(self) -> int:
        return len(self.starts)

    @property
    def has_resets(self) -> bool:
        """Whether any row holds more than one document."""
        return any(len(r) > 1 for r in self.starts)

    def start_of(self, position: int) -> int:
        """The earliest start, over the rows, of the document holding token `position` (from the host's
        lists: no device read). No token at or after `position` attends to a key before it."""
        return min(row[bisect.bisect_right(row, position) - 1] for row in self.starts)

    def end_of(self, position: int) -> int:
        """The latest end (exclusive), over the rows, of the document holding token `position`."""
        return max(
            row[i] if (i := bisect.bisect_right(row, position)) < len(row) else self.length for row in self.starts
        )

    def digest(self) -> int:
        """A summary that differs when any start differs (for the ranks' agreement check)."""
        return hash((self.length, self.starts))

    def __repr__(self) -> str:
        return f"Documents(B={self.batch}, N={self.length}, documents per row={[len(r) for r in self.starts]})"

    def _get(self, key: str, device, build) -> Tensor:
        k = (key, str(device))
        if k not in self._cache:
            self._cache[k] = build().to(device)
        return self._cache[k]

    def ids(self, device=None) -> Tensor:
        """[B, N] int64: each token's document index within its row (0, 1, ...)."""
        return self._get("ids", device, lambda: self.first(None).long().cumsum(1) - 1)

    def first(self, device=None) -> Tensor:
        """[B, N] bool: True at each document's first token (position 0 included)."""

        def build():
            m = torch.zeros(self.batch, self.length, dtype=torch.bool)
            for b, row in enumerate(self.starts):
                m[b, list(row)] = True
            return m

        return self._get("first", device, build)

    def resets(self, device=None) -> Tensor:
        """[B, N] bool: True where the state resets, every document start but position 0."""

        def build():
            r = self.first(None).clone()
            r[:, 0] = False
            return r

        return self._get("resets", device, build)

    def positions(self, device=None) -> Tensor:
        """[B, N] int64: each token's position within its document (RoPE restarts at every document)."""

        def build():
            idx = torch.arange(self.length).expand(self.batch, -1)
            start = torch.where(self.first(None), idx, torch.zeros_like(idx)).cummax(1).values
            return idx - start

        return self._get("positions", device, build)

    def stretched(self, n: int) -> "Documents":
        """The same documents over n rows per token (DeltaProduct's micro-steps): every start times n."""
        key = ("stretched", n)
        if key not in self._cache:
            self._cache[key] = Documents([[s * n for s in row] for row in self.starts], self.length * n)
        return self._cache[key]

    @classmethod
    def from_eos(cls, tokens_BN: Tensor, eos_id: int) -> "Documents":
        """Documents of token rows [B, N]: a new one starts after every `eos_id` token."""
        after = (tokens_BN[:, :-1] == eos_id).cpu()
        return cls([[0] + (torch.nonzero(row).flatten() + 1).tolist() for row in after], tokens_BN.shape[1])


def as_documents(cu_seqlens, B: int, N: int) -> Documents:
    """Validate `cu_seqlens` for B rows of N tokens: a `Documents`, one list [0, ..., N] (B = 1), or B lists
    (a list or 1-D integer tensor each); the trailing N of flash-attention's convention may be left off."""
    if isinstance(cu_seqlens, Documents):
        if (cu_seqlens.batch, cu_seqlens.length) != (B, N):
            raise ValueError(
                f"cu_seqlens describes {cu_seqlens.batch} rows of {cu_seqlens.length} tokens, but the "
                f"input has B={B} rows of N={N} tokens"
            )
        return cu_seqlens
    rows = _rows(cu_seqlens)
    if len(rows) != B:
        raise ValueError(
            f"cu_seqlens has {len(rows)} row(s) for a batch of {B}: give one list per row (one list alone serves B=1)"
        )
    starts = tuple(tuple(r[:-1] if r and r[-1] == N else r) for r in rows)
    problems = [
        f"row {b}: cu_seqlens ends at {r[-1]}, past the sequence of {N} tokens"
        for b, r in enumerate(rows)
        if r and r[-1] > N
    ]
    problems += [p for p in _problems(starts, N) if "at or past the end" not in p]
    if problems:
        raise ValueError("; ".join(problems))
    return Documents(starts, N)


def _ints(x, what: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{what} must be a 1-D integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
        return x.tolist()
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise TypeError(f"{what} must hold ints, got {list(x)[:4]}")
    return list(x)


def _rows(cu_seqlens) -> list[list[int]]:
    if isinstance(cu_seqlens, Tensor):
        return [_ints(cu_seqlens, "cu_seqlens")]
    if not isinstance(cu_seqlens, (list, tuple)) or not cu_seqlens:
        raise TypeError(
            f"cu_seqlens must be a Documents, a list of ints or a list of B lists (or 1-D integer "
            f"tensors), got {type(cu_seqlens).__name__} {cu_seqlens!r}"
        )
    if all(isinstance(i, int) and not isinstance(i, bool) for i in cu_seqlens):
        return [list(cu_seqlens)]
    return [_ints(r, f"cu_seqlens row {b}") for b, r in enumerate(cu_seqlens)]
