"""Softmax attention blocks. Legend: B batch, Tq query tokens, Tk key tokens, Hq query heads,
Hkv key/value heads (Hq % Hkv == 0: GQA / MQA), D head dim of q and k, Dv head dim of v.

Causal masks here are aligned to the END of the keys: query i sits at key position Tk - Tq + i and sees
keys 0..Tk-Tq+i. That is the diagonal block plus everything before it, which is what a chunk of queries
needs when given the keys of all earlier tokens and of its own chunk.

Packed documents: `softmax_attn` takes `cu_seqlens` (lasp.kernels.documents); the SP ops and the block
functions take the document ids of their queries and keys instead (`doc_ids` = (q ids [B, Tq], k ids
[B, Tk])), from the global ids and the layout. A score is kept only where the two ids are equal. A query
whose keys in one block all belong to other documents gets lse = -inf, a zero output and zero gradients
from that block; its own token, in some block, keeps the final result finite.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from lasp.kernels.checks import check_causal, check_qkv, check_scale
from lasp.kernels.documents import Documents, as_documents

DocIds = tuple[Tensor, Tensor]
DOC_QUERY_BLOCK = 4096  # packed documents over a longer sequence run this many queries at a time


def check_softmax_attn_args(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, *, same_length: bool = True
) -> float:
    """Validate the arguments shared by every softmax attention op; return the scale (default D**-0.5).
    `same_length`: q as long as k and v (else at most as long: a block of queries at the end of the keys)."""
    check_qkv(q, k, v, same_length=same_length)
    check_causal(causal)
    if q.shape[1] > k.shape[1]:
        raise ValueError(
            f"more queries ({q.shape[1]}) than keys ({k.shape[1]}): q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    return check_scale(scale, q.shape[-1])


def softmax_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens=None,
    doc_ids: DocIds | None = None,
) -> Tensor:
    """Softmax attention through torch SDPA: q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]
    -> [B, Tq, Hq, Dv]. With Tq < Tk the causal mask is end-aligned (see module doc).

    `cu_seqlens` (Tq == Tk only): packed documents, a `Documents` or flash-attention's cumulative lengths
    (lasp.kernels.documents.as_documents); a query attends only to keys of its own document. Validated
    before any compute. `doc_ids` (q ids [B, Tq], k ids [B, Tk]): the same for a block of queries at the
    end of the keys (the SP ops); every query must share its document with at least one key it may see.
    """
    scale = check_softmax_attn_args(q, k, v, causal, scale, same_length=False)
    Tq, Tk = q.shape[1], k.shape[1]
    if cu_seqlens is not None:
        if doc_ids is not None:
            raise ValueError("pass cu_seqlens or doc_ids, not both")
        if Tq != Tk:
            raise ValueError(
                f"cu_seqlens needs as many queries as keys, got Tq={Tq} and Tk={Tk}: a block of "
                f"queries at the end of the keys takes doc_ids"
            )
        docs = as_documents(cu_seqlens, q.shape[0], Tq)
        if docs.has_resets:
            ids = docs.ids(q.device)
            if Tq > DOC_QUERY_BLOCK:
                return _by_query_blocks(q, k, v, causal, scale, docs, ids)
            doc_ids = (ids, ids)
    mask, is_causal = None, False
    if doc_ids is not None:
        mask = _kept(Tq, Tk, causal, doc_ids, q.device)[:, None]
    elif causal:
        if Tq == Tk:
            is_causal = True
        else:
            mask = causal_lower_right(Tq, Tk)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)


def _by_query_blocks(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, docs: Documents, ids: Tensor
) -> Tensor:
    """Packed documents over a long sequence, DOC_QUERY_BLOCK queries at a time against the keys of their
    documents only (from the host's lists of starts): the masks stay DOC_QUERY_BLOCK x (the documents' span)
    instead of T x T."""
    T, outs = q.shape[1], []
    for a in range(0, T, DOC_QUERY_BLOCK):
        b = min(a + DOC_QUERY_BLOCK, T)
        lo, hi = docs.start_of(a), (b if causal else docs.end_of(b - 1))
        outs.append(
            softmax_attn(
                q[:, a:b], k[:, lo:hi], v[:, lo:hi], causal=causal, scale=scale, doc_ids=(ids[:, a:b], ids[:, lo:hi])
            )
        )
    return torch.cat(outs, dim=1)


def _kept(Tq: int, Tk: int, causal: bool, doc_ids: DocIds | None, device) -> Tensor:
    """The scores kept, [B, Tq, Tk] ([1, Tq, Tk] without `doc_ids`): same document, and causal (end-aligned)."""
    if doc_ids is None:
        keep = torch.ones(1, Tq, Tk, dtype=torch.bool, device=device)
    else:
        q_ids, k_ids = doc_ids
        assert q_ids.shape[1] == Tq and k_ids.shape[1] == Tk, (q_ids.shape, k_ids.shape, Tq, Tk)
        keep = q_ids[:, :, None] == k_ids[:, None, :]
    return keep.tril(Tk - Tq) if causal else keep


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float, doc_ids: DocIds | None) -> Tensor:
    """Scaled scores [B, Hkv, G, Tq, Tk] in float32 or better (G = Hq / Hkv), -inf where masked (causal,
    end-aligned; other documents)."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    dt = _acc(q.dtype)
    s = torch.einsum("bqhgd,bkhd->bhgqk", q.to(dt).view(B, Tq, Hkv, Hq // Hkv, D), k.to(dt)) * scale
    if causal or doc_ids is not None:
        s = s.masked_fill(~_kept(Tq, Tk, causal, doc_ids, q.device)[:, None, None], float("-inf"))
    return s


def _finite(lse: Tensor) -> Tensor:
    """lse with -inf (a query that sees no key of this block) as 0, so that exp(s - lse) is 0, not NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _per_head(x_BTH: Tensor, Hkv: int) -> Tensor:
    """[B, Tq, Hq] -> [B, Hkv, G, Tq] to broadcast against scores."""
    B, T, Hq = x_BTH.shape
    return x_BTH.view(B, T, Hkv, Hq // Hkv).permute(0, 2, 3, 1)


def attn_with_lse(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, doc_ids: DocIds | None = None
) -> tuple[Tensor, Tensor]:
    """One block of attention -> (o [B, Tq, Hq, Dv], lse [B, Tq, Hq]), both float32 or better.

    Scores are materialised (Tq x Tk per head): this is the block form Ring Attention merges.
    `doc_ids` (q ids [B, Tq], k ids [B, Tk]): keep only scores within a document; a query with no key of
    its document here gets lse = -inf and o = 0 (`merge_partials` takes them).
    """
    B, Tq, Hq, _ = q.shape
    s = _scores(q, k, causal, scale, doc_ids)
    lse = torch.logsumexp(s, dim=-1)
    shift = lse if doc_ids is None else _finite(lse)
    o = torch.einsum("bhgqk,bkhd->bqhgd", torch.exp(s - shift[..., None]), v.to(s.dtype))
    return o.reshape(B, Tq, Hq, v.shape[-1]), lse.permute(0, 3, 1, 2).reshape(B, Tq, Hq)


def attn_block_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    do: Tensor,
    lse: Tensor,
    delta: Tensor,
    *,
    causal: bool,
    scale: float,
    doc_ids: DocIds | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block's share of attention whose final softmax statistics are known.

    lse [B, Tq, Hq]: log-sum-exp over ALL keys; delta [B, Tq, Hq] = sum(do * o, -1) of the final
    output. Returns (dq, dk, dv) of this block in float32 or better (the flash-attention backward).
    `doc_ids` as in `attn_with_lse`: masked scores, and so queries with no key here, get zero gradients.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    s = _scores(q, k, causal, scale, doc_ids)
    p = torch.exp(s - _per_head(lse if doc_ids is None else _finite(lse), Hkv)[..., None])
    dog = do.to(s.dtype).view(B, Tq, Hkv, Hq // Hkv, -1)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
    ds = p * (torch.einsum("bqhgd,bkhd->bhgqk", dog, v.to(s.dtype)) - _per_head(delta, Hkv)[..., None])
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(s.dtype)).reshape(B, Tq, Hq, D) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(s.dtype).view(B, Tq, Hkv, Hq // Hkv, D)) * scale
    return dq, dk, dv


def merge_partials(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two attention results over disjoint key sets (online softmax): -> (o, lse). A query whose
    lse is -inf in both (no key in either set) keeps lse = -inf and o = 0."""
    lse = torch.logaddexp(lse1, lse2)
    shift = _finite(lse)
    w1, w2 = torch.exp(lse1 - shift)[..., None], torch.exp(lse2 - shift)[..., None]
    return o1 * w1 + o2 * w2, lse
