"""Argument checks shared by every attention op: clear errors that name the shapes involved."""

from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] with Hq % Hkv == 0, one floating dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must share batch and length: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] < 1:
        raise ValueError(f"sequence length must be >= 1, got q {tuple(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v need the same number of heads: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share a floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
