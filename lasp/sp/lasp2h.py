"""LASP-2H: softmax attention layers of a hybrid model, sequence-parallel on the same layout as LASP-2.

Legend: B batch, T local tokens, N global tokens, Hq query heads, Hkv key/value heads, L chunk length.

Forward: ONE all-gather of the local K and V (only the KV heads, packed in one buffer), put in global
order, then each local chunk of queries attends, through torch SDPA, to the keys up to the end of that
chunk with an end-aligned causal mask: the mask comes from global positions, so contiguous and zigzag are
both exact, and no rank builds an N x N mask. Backward (autograd of the gather): ONE reduce-scatter
returns dK and dV to their owners. Packed documents add a document mask to each SDPA call, from the
global document ids sliced by the same chunk ids (no communication), and a chunk's keys start at the
start of its first query's document, so short documents keep the masks small.
"""

import torch
from torch import Tensor

from lasp.distributed import all_gather_stack, group_rank
from lasp.kernels.softmax_attn import softmax_attn
from lasp.sp.dispatch import run_sp_softmax_attn
from lasp.sp.kv import pack_kv, unpack_kv
from lasp.sp.layout import SeqLayout, shard_sequence, stacked_to_global


def lasp2h_softmax_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
    check_ranks: bool = True,
    cu_seqlens=None,
) -> Tensor:
    """LASP-2H softmax attention over `group` (None = the default group).

    q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] are this rank's shards under `layout`
    (Hq % Hkv == 0). Returns this rank's shard of softmax attention on the whole sequence.
    `check_ranks`: the K/V all-gather carries every rank's fingerprint (as in `lasp2_linear_attn`).
    `cu_seqlens`: packed documents of the GLOBAL rows of W*T tokens, the same on every rank (a `Documents`
    or flash-attention's cumulative lengths, see `softmax_attn`): no query attends across a document start.
    """
    return run_sp_softmax_attn(
        _lasp2h,
        q,
        k,
        v,
        op="lasp2h",
        group=group,
        layout=layout,
        causal=causal,
        scale=scale,
        check_ranks=check_ranks,
        in_band=True,
        cu_seqlens=cu_seqlens,
    )


def _lasp2h(q: Tensor, k: Tensor, v: Tensor, lay: SeqLayout, group, causal: bool, scale: float, fp, docs) -> Tensor:
    rank, L = group_rank(group), q.shape[1] // lay.chunks_per_rank
    kv_full = stacked_to_global(all_gather_stack(pack_kv(k, v), group, fp), lay)
    k_full, v_full = unpack_kv(kv_full, k.shape[2], k.shape[3])
    ids = None if docs is None else docs.ids(q.device)  # [B, N]
    if not causal:
        pair = (
            None if ids is None else (shard_sequence(ids, rank=rank, world_size=lay.world_size, layout=lay.kind), ids)
        )
        return softmax_attn(q, k_full, v_full, causal=False, scale=scale, doc_ids=pair)
    outs = []
    for i, c in enumerate(lay.chunks_of(rank)):
        end = (c + 1) * L
        lo = 0 if docs is None else docs.start_of(c * L)  # keys before the chunk's first document: all masked
        pair = None if ids is None else (ids[:, c * L : end], ids[:, lo:end])
        outs.append(
            softmax_attn(q[:, i * L : (i + 1) * L], k_full[:, lo:end], v_full[:, lo:end], scale=scale, doc_ids=pair)
        )
    return torch.cat(outs, dim=1)
