"""LoRA adapters on a LinearLlama's projections (model.lora_rank, lora_alpha, lora_targets).

A targeted nn.Linear becomes a `LoRALinear`: W x + (alpha / r) B A x, with A [r, in] drawn as peft draws it
(Kaiming-uniform) and B [out, r] zero, so an adapted model starts exactly where its base is. The adapters
are ordinary parameters named `<projection>.lora_A` and `.lora_B` beside the projection's weight: they are
checkpointed, resumed and resharded like any other (tensor parallelism: lasp.parallel.tp), and
`merge_lora` folds them into the weights for export (W + (alpha / r) B A).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter: y = W x (+ b) + scaling B (A x), scaling = alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's initialisation

    enabled = True
    """False: the base layer alone (lasp.model.llama.softmax_teacher)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return super().forward(x)
        return super().forward(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)


def targets(cfg) -> list[str]:
    """The projection names of model.lora_targets (comma-separated)."""
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


def add_lora(model: nn.Module, cfg) -> int:
    """Replace every targeted projection of `model`'s blocks by a LoRALinear (same weights, new adapters);
    returns how many. The adapters are drawn after every base weight, so the base is the same as without."""
    names = set(targets(cfg))
    swapped = 0
    for block in model.layers:
        for parent in (block.mixer, block.mlp):
            for name, child in list(parent.named_children()):
                if name in names and type(child) is nn.Linear:
                    setattr(parent, name, LoRALinear(child, cfg.lora_rank, cfg.lora_alpha))
                    swapped += 1
    return swapped


def merge_lora(model: nn.Module) -> nn.Module:
    """The same function without adapters: a new model of `model`'s class (model.lora_rank 0) whose targeted
    weights are W + (alpha / r) B A."""
    cfg = dataclasses.replace(model.cfg, lora_rank=0)
    sd = {}
    lora = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in lora and leaf in ("lora_A", "lora_B"):
            continue
        if owner in lora and leaf == "weight":
            value = model.get_submodule(owner).merged_weight().detach()
        sd[key] = value
    merged = type(model)(cfg).to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    merged.load_state_dict(sd)
    return merged
