"""K and V travel together: one [B, T, Hkv*(D+Dv)] buffer per message, split back on arrival."""

import torch
from torch import Tensor


def pack_kv(k: Tensor, v: Tensor) -> Tensor:
    """k [B, T, Hkv, D], v [B, T, Hkv, Dv] -> [B, T, Hkv*(D+Dv)]."""
    return torch.cat([k.flatten(2), v.flatten(2)], dim=-1)


def unpack_kv(kv: Tensor, heads: int, dk: int) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_kv` given Hkv and D."""
    split = heads * dk
    return kv[..., :split].unflatten(-1, (heads, dk)), kv[..., split:].unflatten(-1, (heads, -1))
