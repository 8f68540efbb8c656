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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasp.model.config import MoEConfig
from lasp.model.layers import SwiGLU


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
