"""The sampler and the loader: pure functions of (seed, step).

There is no iterator state: the data position of a run is its step, so a run resumed at step s, or restarted
with other DP / SP sizes, reads exactly the samples it would have read. Each rank reads from the memory map
only its own DP rows and, of each row, only its own SP chunks (plus the one label token after each chunk).
"""

from functools import lru_cache

import numpy as np
import torch

from lasp.kernels.documents import Documents
from lasp.sp.layout import LAYOUTS, SeqLayout


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    # cached because every step of an epoch needs the same permutation; read-only so the cache stays right
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False
    return perm


def global_sample_ids(seed: int, step: int, global_batch: int, num_samples: int, shuffle: bool = True) -> np.ndarray:
    """int64 [global_batch]: the sample ids of step `step`.

    The samples form an endless sequence of epochs, epoch e being a permutation of range(num_samples) drawn
    from np.random.default_rng([seed, e]); step s takes positions s*global_batch .. (s+1)*global_batch - 1 of
    it (a step may straddle epochs). With shuffle=False position p is sample p % num_samples (for eval).
    """
    for name, value, low in (("seed", seed, 0), ("step", step, 0), ("global_batch", global_batch, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    pos = step * global_batch + np.arange(global_batch, dtype=np.int64)
    idx = pos % num_samples
    if not shuffle:
        return idx
    epochs = pos // num_samples
    ids = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        ids[sel] = _permutation(int(seed), int(e), int(num_samples))[idx[sel]]
    return ids


def epoch_of(step: int, global_batch: int, num_samples: int) -> float:
    """Epochs completed before step `step` (fractional, for logging)."""
    return step * global_batch / num_samples


def _problems(data, seq_len, global_batch, microbatches, dp_rank, dp, sp_rank, sp, layout) -> list[str]:
    p = []
    sizes = {"seq_len": seq_len, "global_batch": global_batch, "microbatches": microbatches, "dp": dp, "sp": sp}
    for name, value in sizes.items():
        if value < 1:
            p.append(f"{name} must be >= 1, got {value}")
    if p:
        return p
    if not 0 <= dp_rank < dp:
        p.append(f"dp_rank {dp_rank} is outside 0..{dp - 1} (dp = {dp})")
    if not 0 <= sp_rank < sp:
        p.append(f"sp_rank {sp_rank} is outside 0..{sp - 1} (sp = {sp})")
    if layout not in LAYOUTS:
        p.append(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    elif sp > 1 and seq_len % SeqLayout(layout, sp).num_chunks:
        chunks = SeqLayout(layout, sp).num_chunks
        p.append(f"seq_len {seq_len} is not divisible by the {chunks} chunks of the {layout} layout over sp = {sp}")
    if global_batch % (dp * microbatches):
        p.append(f"global_batch {global_batch} is not divisible by dp x microbatches = {dp} x {microbatches}")
    if data.num_samples(seq_len) < 1:
        need = seq_len + 1
        p.append(f"{data!r} has {data.num_tokens} tokens: too few for one sample of seq_len {seq_len} (needs {need})")
    return p


def local_microbatches(
    data,
    *,
    seq_len: int,
    global_batch: int,
    microbatches: int,
    seed: int,
    step: int,
    dp_rank: int,
    dp: int,
    sp_rank: int,
    sp: int,
    layout: str,
    shuffle: bool = True,
    eos_id: int | None = None,
) -> list[dict]:
    """This rank's part of step `step`: `microbatches` dicts of int64 tensors [global_batch/dp/microbatches,
    seq_len/sp] named tokens, positions (global positions 0..seq_len-1 within the sample) and labels.

    `data` is a TokenData. The rows are those of DP replica dp_rank; of each row only the chunks that sp_rank
    holds under `layout` (lasp.sp.layout) are read. Equal to lasp.parallel.batch.local_microbatches on the
    full windows [global_batch, seq_len + 1] of the step's samples.

    `eos_id`: packed documents reset at every document start (the token after an EOS). Each microbatch
    then also holds `documents`, a lasp.kernels.documents.Documents of its rows' GLOBAL starts (read from the
    whole rows, so every SP rank has the same), and positions restart at 0 at every start (for RoPE).
    """
    problems = _problems(data, seq_len, global_batch, microbatches, dp_rank, dp, sp_rank, sp, layout)
    if problems:
        raise ValueError("cannot build the local batch:\n  " + "\n  ".join(problems))
    # with one SP rank the whole sequence is local whatever the layout (as in lasp.parallel.batch)
    lay = SeqLayout(layout, sp)
    chunks = np.array(lay.chunks_of(sp_rank) if sp > 1 else (0,), dtype=np.int64)  # [n]
    chunk_len = seq_len // (lay.num_chunks if sp > 1 else 1)
    rows = global_batch // dp
    ids = global_sample_ids(seed, step, global_batch, data.num_samples(seq_len), shuffle)
    ids = ids[dp_rank * rows : (dp_rank + 1) * rows]  # [rows]
    starts = ids[:, None] * seq_len + chunks[None, :] * chunk_len  # [rows, n]
    index = starts[..., None] + np.arange(chunk_len + 1)  # [rows, n, L+1]: each chunk and its next token
    window = np.asarray(data.tokens[index], dtype=np.int64)
    tokens = window[..., :-1].reshape(rows, -1)
    labels = window[..., 1:].reshape(rows, -1)
    positions = (chunks[:, None] * chunk_len + np.arange(chunk_len)).reshape(1, -1).repeat(rows, axis=0)
    m = rows // microbatches
    out = [
        {
            "tokens": torch.from_numpy(tokens[i * m : (i + 1) * m].copy()),
            "positions": torch.from_numpy(positions[i * m : (i + 1) * m].copy()),
            "labels": torch.from_numpy(labels[i * m : (i + 1) * m].copy()),
        }
        for i in range(microbatches)
    ]
    if eos_id is not None:
        whole = torch.from_numpy(np.asarray(data.tokens[ids[:, None] * seq_len + np.arange(seq_len)], dtype=np.int64))
        local = torch.from_numpy(positions[0])  # the global positions this rank holds
        for i, mb in enumerate(out):
            mb["documents"] = Documents.from_eos(whole[i * m : (i + 1) * m], eos_id)
            mb["positions"] = mb["documents"].positions()[:, local]
    return out
