"""Building blocks of Linear-Llama: RMSNorm, SwiGLU MLP, RoPE, decays and feature maps.

Legend: B batch, T tokens, H heads, D head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasp.model.variants import VARIANTS


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in float32 or better (`float32`: in float32 always, as transformers does)."""

    def __init__(self, dim: int, eps: float, float32: bool = False):
        super().__init__()
        self.eps, self.float32 = eps, float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if self.float32 or x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(D: int, theta: float, scaling: dict | None = None, dtype=torch.float64) -> Tensor:
    """RoPE's inverse frequencies [D/2] (float64): theta^(-2i/D), with Llama 3.1's scaling when `scaling`
    is {factor, low_freq_factor, high_freq_factor, original_max_positions} (as transformers'
    `_compute_llama3_parameters`): long wavelengths divided by factor, short ones kept, a smooth blend
    between. In `dtype` (float32: transformers' own rounding)."""
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).to(dtype) / D))
    if scaling is None:
        return inv
    factor, low, high, old = (
        scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_positions")
    )
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope(x_BTHD: Tensor, positions_BT: Tensor, theta: float, inv_freq: Tensor | None = None) -> Tensor:
    """Rotary embedding (rotate-half form) at the given global token positions; `inv_freq` [D/2] from
    `rope_frequencies` (default: unscaled, from theta), whose dtype the angles are computed in."""
    D = x_BTHD.shape[-1]
    inv = (rope_frequencies(D, theta) if inv_freq is None else inv_freq).to(x_BTHD.device)
    ang = positions_BT.to(inv.dtype)[..., None] * inv  # [B, T, D/2]
    cos = torch.cos(ang).repeat(1, 1, 2)[:, :, None, :].to(x_BTHD.dtype)
    sin = torch.sin(ang).repeat(1, 1, 2)[:, :, None, :].to(x_BTHD.dtype)
    x1, x2 = x_BTHD[..., : D // 2], x_BTHD[..., D // 2 :]
    return x_BTHD * cos + torch.cat([-x2, x1], dim=-1) * sin


def _alibi_slopes(n: int) -> list[float]:
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def log_decay(variant: str, num_heads: int, layer: int, num_layers: int) -> Tensor | None:
    """Per-head log-decay [H] (float64, <= 0) of a linear-attention layer, or None for `basic`.

    lightning: ALiBi slopes scaled down with depth as in TransNormerLLM / Lightning Attention;
    retention: RetNet's gamma_h = 1 - 2^(-5-h).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown linear variant {variant!r}")
    if VARIANTS[variant].decay != "constant":  # none, or a data-dependent gate instead
        return None
    if variant == "lightning":
        depth = 1 - layer / max(num_layers - 1, 1) + 1e-5
        return -torch.tensor(_alibi_slopes(num_heads), dtype=torch.float64) * depth
    if variant == "retention":
        return torch.log(1 - 2.0 ** (-5 - torch.arange(num_heads, dtype=torch.float64)))
    raise ValueError(f"linear variant {variant!r} has a constant decay but no formula for it here")


class LogGate(nn.Module):
    """Data-dependent log-gates of a linear-attention layer: logsigmoid(projection of x) / normalizer, <= 0.

    simple_gla: one per token and head, [B, T, H] (hidden -> H). gla: one per token, head and key dim,
    [B, T, H, D], through a low-rank projection (hidden -> rank -> H x D), as GLA. No biases (tensor
    parallelism splits the last projection by heads like q)."""

    def __init__(self, variant: str, hidden: int, heads: int, head_dim: int, rank: int, normalizer: float):
        super().__init__()
        self.vector, self.head_dim, self.normalizer = VARIANTS[variant].gate == "vector", head_dim, normalizer
        if self.vector:
            self.down = nn.Linear(hidden, rank, bias=False)
            self.proj = nn.Linear(rank, heads * head_dim, bias=False)
        else:
            self.down = None
            self.proj = nn.Linear(hidden, heads, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(x if self.down is None else self.down(x))
        g = F.logsigmoid(z.float()) / self.normalizer
        return g.unflatten(-1, (-1, self.head_dim)) if self.vector else g


class ShortConv(nn.Module):
    """Depthwise causal convolution of `width` taps over the sequence, then SiLU (flash-linear-attention's
    ShortConvolution; nn.Conv1d's weight layout and initialisation, the last tap on the current token).

    forward(x [B, T, C], positions [B, T], halo [n, B, width-1, C]): x holds n chunks of the sequence (one
    on a device of its own; a rank's chunks under sequence parallelism, lasp.sp.halo) and halo the rows
    before each. A tap reaching j tokens back counts only where the token's position is at least j: a
    document start (positions restart at 0) cuts the convolution."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        nn.init.uniform_(self.weight, -(width**-0.5), width**-0.5)  # kaiming_uniform(a=sqrt(5)), fan_in = width

    def forward(self, x: Tensor, positions: Tensor, halo: Tensor) -> Tensor:
        n, w = halo.shape[0], self.width
        B, T, C = x.shape
        L = T // n
        ext = torch.cat([halo.to(x.dtype), x.view(B, n, L, C).transpose(0, 1)], dim=2)  # [n, B, w-1+L, C]
        pos = positions.view(B, n, L).transpose(0, 1)[..., None]
        y = ext[:, :, w - 1 :] * self.weight[:, w - 1]
        for j in range(1, w):
            y = y + ext[:, :, w - 1 - j : w - 1 - j + L] * self.weight[:, w - 1 - j] * (pos >= j)
        return F.silu(y.transpose(0, 1).reshape(B, T, C))


FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "silu": F.silu,
}


class Hedgehog(nn.Module):
    """LoLCATs' Hedgehog feature map, per head: phi(x) = [softmax(x W_h), softmax(-x W_h)] over the feature
    dim, x [B, T, heads, D] -> [B, T, heads, 2 D], positive; W_h [D, D] starts at the identity (LoLCATs'
    initialisation) and is what attention transfer trains. Tensor parallelism splits W by heads."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))
        self.weight.no_weight_decay = True

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        z = torch.einsum("bthd,hde->bthe", xf, self.weight.to(xf.dtype))
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1).to(x.dtype)


def feature_map(name: str, heads: int, head_dim: int) -> nn.Module | None:
    """The module of a learned feature map (hedgehog), or None for the fixed ones in FEATURE_MAPS."""
    return Hedgehog(heads, head_dim) if name == "hedgehog" else None
