"""Mixture-of-experts feed-forward layers on one device: a top-k router over SwiGLU experts, an optional
shared expert, and the balancing losses.

This is the plain reference: the same routing megatron-core computes (lasp.parallel.ep runs these weights
in megatron's MoELayer, under expert parallelism), written out in torch so that the single-device model
needs no process groups. Per token x (flattened over the batch and the sequence):

- logits = x W_r^T [E] (float32, or float64 for a float64 model);
- softmax router (Mixtral): the top-k logits, softmax over those k (= the softmax over all E experts,
  renormalised over the top k); with k = 1 (Switch) the softmax over all E, the top one's probability;
- sigmoid router (DeepSeek-V3): s = sigmoid(logits), the top k of s + b
  (b the expert bias, moved by `update_expert_bias` and never by gradients), weights s / sum s over the k;
- with a capacity factor, each expert keeps at most ceil(tokens * k / E * factor) tokens, those of the
  highest weights (megatron's "probs" drop policy); otherwise no token is dropped;
- out = sum over the chosen experts of weight * expert(x), plus shared(x) when there is a shared expert.

Losses, from the last training forward, with grad (`MoE.aux_loss`), over the tokens of that forward:
- load balancing (Switch Transformer): coeff * E / (k N^2) * sum_i P_i c_i, with N the tokens, c_i how many
  chose expert i among the top k of the unbiased normalised scores, P_i the sum over tokens of those scores;
- z-loss (ST-MoE): coeff * mean over tokens of logsumexp(logits)^2.
Router probabilities are computed in float32 whatever the model's dtype (float64 stays float64 for the
logits), as megatron-core computes them.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasp.model.layers import SwiGLU

ROUTERS = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """model.moe: which feed-forward layers are mixtures of experts, and how they route."""

    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    ffn_hidden_size: int = 64
    """Inner width of each routed expert's SwiGLU."""
    shared_ffn_hidden_size: int = 0
    """Inner width of a shared expert that every token goes through (DeepSeek, Qwen-MoE); 0: none."""
    pattern: str = "M"
    """Feed-forward kind of each layer, repeated cyclically like model.layer_pattern: M = mixture of
    experts, D = the dense MLP (e.g. "DM": every other layer, from the second)."""
    router: str = "softmax"
    """softmax (Mixtral: the top k logits, softmax over them; with top_k 1, Switch: the softmax over all
    experts, the top one's probability) or sigmoid (DeepSeek-V3: sigmoid scores,
    normalised over the top k)."""
    expert_bias: bool = False
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the choice
    only, moved after every step by bias_update_rate against the load. Needs router sigmoid."""
    bias_update_rate: float = 1e-3
    """Step of the expert bias: b_i += rate * sign(mean load - load_i) per training step."""
    aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss (per MoE layer); 0: none."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss (per MoE layer); 0: none."""
    capacity_factor: float | None = None
    """None: dropless (every token reaches its k experts). A number: each expert takes at most
    ceil(tokens x top_k / num_experts x factor) tokens of a forward, on each rank; the rest are dropped."""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("invalid MoE config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        from lasp.model.config import type_problems

        bad = type_problems(self, "model.moe")
        p = list(bad.values())
        for name in ("num_experts", "top_k", "ffn_hidden_size"):
            if name not in bad and getattr(self, name) < 1:
                p.append(f"model.moe.{name} must be >= 1, got {getattr(self, name)}")
        if not {"num_experts", "top_k"} & set(bad) and self.top_k > self.num_experts:
            p.append(f"model.moe.top_k ({self.top_k}) must be at most model.moe.num_experts ({self.num_experts})")
        if "shared_ffn_hidden_size" not in bad and self.shared_ffn_hidden_size < 0:
            p.append(
                f"model.moe.shared_ffn_hidden_size must be >= 0 (0: no shared expert), got "
                f"{self.shared_ffn_hidden_size}"
            )
        if "pattern" not in bad and (not self.pattern or not set(self.pattern) <= {"M", "D"}):
            p.append(f"model.moe.pattern must be a non-empty string of M (MoE) and D (dense), got {self.pattern!r}")
        router_ok = "router" not in bad and self.router in ROUTERS
        if "router" not in bad and not router_ok:
            p.append(f"model.moe.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if router_ok and "expert_bias" not in bad and self.expert_bias and self.router != "sigmoid":
            p.append(
                "model.moe.expert_bias (auxiliary-loss-free balancing) needs model.moe.router sigmoid, got "
                f"{self.router}"
            )
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            if name not in bad and not getattr(self, name) >= 0:
                p.append(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        if "capacity_factor" not in bad and self.capacity_factor is not None and not self.capacity_factor > 0:
            p.append(f"model.moe.capacity_factor must be > 0 or null (dropless), got {self.capacity_factor}")
        return p

    def is_moe(self, layer: int) -> bool:
        return self.pattern[layer % len(self.pattern)] == "M"


def recomputing() -> bool:
    """True inside a backward pass: activation checkpointing re-running a forward, whose routing statistics
    were already counted."""
    return torch._C._current_graph_task_id() != -1


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the router's logits are computed in: float64 for a float64 model, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def capacity(tokens: int, cfg: MoEConfig) -> int:
    """Tokens an expert takes in a forward of `tokens` tokens (megatron's get_capacity)."""
    return math.ceil(tokens * cfg.top_k / cfg.num_experts * cfg.capacity_factor)


def route(logits: Tensor, cfg: MoEConfig, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """logits [N, E] -> (weights [N, E], zero where not chosen; chosen [N, E] bool)."""
    k = cfg.top_k
    if cfg.router == "softmax" and k == 1:  # Switch: the softmax over every expert, the top one's share
        w, idx = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits).topk(1, dim=1)
    elif cfg.router == "softmax":
        top, idx = logits.topk(k, dim=1)
        w = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
    else:
        s = torch.sigmoid(logits.float()).type_as(logits)
        idx = (s + bias if bias is not None else s).topk(k, dim=1)[1]
        w = s.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) if k > 1 else w
    weights = torch.zeros_like(logits).scatter(1, idx, w)
    chosen = torch.zeros_like(logits, dtype=torch.int32).scatter(1, idx, 1).bool()
    if cfg.capacity_factor is not None:
        keep = capacity(logits.shape[0], cfg)
        if keep <= logits.shape[0]:
            top = weights.topk(keep, dim=0, sorted=False)[1]
            chosen = chosen & torch.zeros_like(chosen).scatter(0, top, True)
            weights = weights * chosen
    return weights, chosen


def balancing_loss(logits: Tensor, cfg: MoEConfig) -> Tensor:
    """The Switch Transformer load-balancing loss of logits [N, E] (see the module doc), times its coeff."""
    if cfg.router == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    idx = scores.topk(cfg.top_k, dim=1)[1]
    counts = torch.zeros_like(logits, dtype=torch.int32).scatter(1, idx, 1).bool().sum(0)
    n, e = logits.shape
    return (scores.sum(0) * counts).sum() * (e * cfg.aux_loss_coeff / (cfg.top_k * n * n))


def z_loss(logits: Tensor, cfg: MoEConfig) -> Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean() * cfg.z_loss_coeff


class MoE(nn.Module):
    """x [B, T, hidden] -> [B, T, hidden]: the routed experts' weighted sum (+ the shared expert's)."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(hidden, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, cfg.ffn_hidden_size) for _ in range(cfg.num_experts))
        self.shared = SwiGLU(hidden, cfg.shared_ffn_hidden_size) if cfg.shared_ffn_hidden_size else None
        self.register_buffer(
            "expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32) if cfg.expert_bias else None
        )
        self.load = torch.zeros(cfg.num_experts)
        """Tokens each expert received in training forwards since the last `update_expert_bias` / reset."""
        self.last_aux: Tensor | None = None

    def logits(self, x: Tensor) -> Tensor:
        rd = router_dtype(x.dtype)
        return F.linear(x.reshape(-1, x.shape[-1]).to(rd), self.router.weight.to(rd))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.logits(x)
        weights, chosen = route(logits, self.cfg, self.expert_bias)
        if self.training and torch.is_grad_enabled():
            aux = logits.new_zeros(())
            if self.cfg.aux_loss_coeff:
                aux = aux + balancing_loss(logits, self.cfg)
            if self.cfg.z_loss_coeff:
                aux = aux + z_loss(logits, self.cfg)
            if not recomputing():  # activation checkpointing's second forward: the first one counted
                self.last_aux = aux
                self.load = self.load.to(logits.device) + chosen.sum(0).to(self.load.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = chosen[:, e].nonzero().squeeze(1)
            if rows.numel():
                y = expert(flat[rows]) * weights[rows, e, None].to(flat.dtype)
                out = out.index_add(0, rows, y)
        out = out.view_as(x)
        return out + self.shared(x) if self.shared is not None else out

    @torch.no_grad()
    def update_expert_bias(self, load: Tensor | None = None) -> None:
        """Move the expert bias against the load (`load`, default this module's own count) and reset the
        count: b_i += rate * sign(mean - load_i)."""
        load = self.load if load is None else load
        if self.expert_bias is not None:
            self.expert_bias += torch.sign(load.mean() - load).to(self.expert_bias) * self.cfg.bias_update_rate
        self.load = torch.zeros_like(self.load)


def aux_loss(model: nn.Module) -> Tensor | None:
    """The sum of every MoE layer's balancing and z-losses from its last training forward (None without
    MoE layers): add it to the LM loss of that forward to train a single-device model."""
    losses = [m.last_aux for m in model.modules() if isinstance(m, MoE) and m.last_aux is not None]
    return sum(losses) if losses else None
