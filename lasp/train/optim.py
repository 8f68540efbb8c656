"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

import math

import torch
from torch import nn

from lasp.train.config import OptimConfig, ScheduleConfig


def build_optimizer(module: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `module`'s parameters; norm weights (1-D) get no weight decay. Fused on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, optim: OptimConfig, sched: ScheduleConfig, total_steps: int) -> float:
    """Learning rate of step `step` (0-based): linear warmup to optim.lr over warmup_steps (the first
    step already trains, at lr / warmup_steps), then a cosine down to min_lr_ratio * lr at decay_steps."""
    peak, floor = optim.lr, optim.lr * sched.min_lr_ratio
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    end = sched.decay_steps or total_steps
    if step >= end:
        return floor
    progress = (step - sched.warmup_steps) / max(1, end - sched.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
