"""Argument checks shared by every attention op: clear errors that name the shapes and values involved."""

import math

from torch import Tensor


def _check_4d(**tensors) -> None:
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, T, H, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool = True) -> None:
    """q [B, Tq, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] with Hq % Hkv == 0 and one floating dtype.
    `same_length`: Tq == T (every op but a block of queries against a longer run of keys)."""
    _check_4d(q=q, k=k, v=v)
    if same_length and (q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]):
        raise ValueError(
            f"q, k, v must share batch and length: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not same_length and (k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]):
        raise ValueError(
            f"q, k, v must share the batch, and k, v the length: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence length must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v need the same number of heads: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share a floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_causal(causal) -> bool:
    """`causal` is a bool (not 0/1, a string or a tensor: `causal="false"` would be truthy)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r} ({type(causal).__name__})")
    return causal


def check_scale(scale, head_dim: int) -> float:
    """The attention scale: a finite number > 0, or None for head_dim ** -0.5."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (or None for head_dim ** -0.5), got {scale!r}")
    return float(scale)
