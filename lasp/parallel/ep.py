"""Expert parallelism: every MoE layer of a built single-device model runs in megatron-core's MoELayer
(its top-k router and its all-to-all token dispatcher), holding this rank's experts.

Where the tokens go, per MoE layer:
1. Under TP every TP rank holds the same tokens (the dense layers' convention); the MoE layer splits them
   over the TP ranks first (megatron's sequence-parallel region) and gathers the outputs after, so no
   token is routed twice. The router's weight then gets a partial gradient on each TP rank
   (`tp_partial_grad`).
2. The router scores the local tokens; megatron's dispatcher sends each to the EP rank holding its expert
   (all-to-all over groups.ep, carved from the DP x SP ranks: the tokens of one sequence spread over SP
   ranks reach their experts there) and, with parallel.etp = tp, gathers them over the TP group, whose
   ranks hold slices of every local expert's width.
3. The local experts (`_Experts`: SwiGLUs holding this rank's experts, or their TP slices) compute, the
   dispatcher brings the outputs back, weighted by the router.
4. The shared expert, when there is one, runs on every token like the dense MLP (TP-split by apply_tp).

Expert parameters carry `allreduce = False`: megatron's DDP reduces their gradients over groups.expt_dp,
not DP x SP. Every parameter keeps the single-device model's name (`full_name`), so checkpoints reshard
between any (tp, sp, ep).

Balancing losses (the convention, tested): statistics are global over the tokens of one microbatch on one
DP rank, i.e. over every SP and TP rank of the sequence (megatron's "aux_loss" over its TP x CP group),
and the objective is the LM mean loss plus each MoE layer's (balancing + z) loss averaged over the
microbatches and DP ranks. A single process with the same microbatches computes the same. The gradient
enters through megatron's MoEAuxLossAutoScaler, whose scale `set_aux_scale` sets per step.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor, nn

from lasp.model.layers import SwiGLU
from lasp.model.llama import LinearLlama
from lasp.model.moe import MoE, MoEConfig, recomputing


class _Router(TopKRouter):
    """megatron's top-k router, keeping for the logs (and the expert bias) each expert's token count and
    the balancing and z statistics of the training forwards since the last `moe_step`."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.load = torch.zeros(config.num_moe_experts, dtype=torch.float64)
        self.aux_sum = torch.zeros((), dtype=torch.float64)
        self.z_sum = torch.zeros((), dtype=torch.float64)

    def routing(self, logits: Tensor, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask)
        if self.training and torch.is_grad_enabled() and not recomputing():
            with torch.no_grad():
                self.load += routing_map.sum(0).double().cpu()
                self.z_sum += torch.logsumexp(logits.detach(), -1).square().sum().double().cpu()
        return probs, routing_map

    def _apply_expert_bias(self, routing_map: Tensor, padding_mask=None) -> None:
        """Nothing: megatron counts each expert's tokens here for its own bias update, under torch.compile
        (about 7 s of compiling per process on CPU for one in-place sum); `load` above replaces that count
        and skips recomputed forwards, and `moe_step` updates the bias from it."""

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, *args, **kwargs):
        if not recomputing():
            self.aux_sum += aux_loss.detach().double().cpu() / aux_loss_coeff  # this rank's share
        return super().attach_and_log_load_balancing_loss(activation, aux_loss_coeff, aux_loss, *args, **kwargs)


class _Experts(nn.Module):
    """This rank's experts (their width slices under expert TP), with megatron's experts interface:
    (tokens sorted by local expert [n, hidden], tokens per local expert, router weights [n]) ->
    (outputs [n, hidden], None). The expert TP slices' partial outputs are summed by the dispatcher."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
        super().__init__()
        self.local = nn.ModuleList()

    def forward(self, x: Tensor, tokens_per_expert, probs: Tensor):
        counts = [int(n) for n in tokens_per_expert]
        outs = [
            expert(part) * w[:, None].to(part.dtype)
            for expert, part, w in zip(self.local, x.split(counts), probs.split(counts))
        ]
        return torch.cat(outs) if outs else x[:0], None


def _copy_param(new: nn.Parameter, old: Tensor, full_name: str, tp_dim: int | None = None) -> None:
    with torch.no_grad():
        new.copy_(old)
    new.full_name, new.tp_dim = full_name, tp_dim


class ParallelMoE(nn.Module):
    """A MoE layer of the model under TP x SP x EP: x [b, T_local, hidden] -> [b, T_local, hidden]."""

    def __init__(self, moe: MoE, name: str, mcfg, groups, tp: int, etp: int):
        super().__init__()
        self.cfg: MoEConfig = moe.cfg
        self.tp_group = groups.tp if tp > 1 else None
        self.layer = MoELayer(
            mcfg,
            MoESubmodules(experts=_Experts, shared_experts=None, router=_Router),
            pg_collection=_collection(groups),
        )
        router = self.layer.router
        _copy_param(router.weight, moe.router.weight, f"{name}.router.weight")
        router.weight.tp_partial_grad = tp > 1  # each TP rank routes its share of the tokens
        if moe.expert_bias is not None:
            router.expert_bias.copy_(moe.expert_bias)
            router.expert_bias.full_name = f"{name}.expert_bias"
        split = tp if etp > 1 else 1
        rank = dist.get_rank(groups.tp) if split > 1 else 0
        for e in self.layer.local_expert_indices:
            src = moe.experts[e]
            inner = src.gate_proj.out_features // split
            dst = SwiGLU(src.gate_proj.in_features, inner).to(src.gate_proj.weight)  # its dtype and device
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                w = getattr(src, proj).weight.chunk(split, dim=dim)[rank]
                p = getattr(dst, proj).weight
                _copy_param(p, w, f"{name}.experts.{e}.{proj}.weight", dim if split > 1 else None)
                p.allreduce = False  # megatron's DDP: reduced over the expert-data-parallel group
            self.layer.experts.local.append(dst)
        self.layer.to(moe.router.weight.device)  # megatron builds on the CPU; in place: the attributes stay
        self.shared = moe.shared  # TP-split by apply_tp like the dense MLP

    def forward(self, x: Tensor) -> Tensor:
        b, t, h = x.shape
        flat = x.reshape(b * t, 1, h)  # megatron's [tokens, batch, hidden]; routing is per token
        if self.tp_group is not None:
            flat = scatter_to_sequence_parallel_region(flat, group=self.tp_group)
        out, _ = self.layer(flat)
        if self.tp_group is not None:
            # the dense layers' convention: the output (and its gradient) is the same on every TP rank
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False, group=self.tp_group)
        out = out.view(b, t, h)
        return out + self.shared(x) if self.shared is not None else out


def _collection(groups):
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection()
    pgs.tp, pgs.cp, pgs.ep = groups.tp, groups.sp, groups.ep
    pgs.expt_tp, pgs.tp_ep, pgs.expt_dp = groups.expt_tp, groups.tp_ep, groups.expt_dp
    pgs.tp_cp, pgs.tp_dp_cp = groups.tp_sp, groups.stage
    return pgs


def moe_megatron_config(moe: MoEConfig, model_cfg, tp: int, sp: int, pp: int, ep: int, etp: int, dtype: torch.dtype):
    """megatron-core's TransformerConfig for the MoE layers, mapped from model.moe."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_heads,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_score_function=moe.router,
        moe_router_pre_softmax=moe.router == "softmax" and moe.top_k == 1,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff else "none",
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_router_dtype="fp64" if dtype == torch.float64 else "fp32",
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        context_parallel_size=sp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,
        calculate_per_token_loss=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        gradient_accumulation_fusion=False,
    )


def apply_ep(model: LinearLlama, cfg, groups) -> None:
    """Swap every MoE layer of `model` for its megatron MoELayer holding this rank's experts, in place
    (after apply_tp, which split the shared experts)."""
    moe = model.cfg.moe
    if moe is None:
        return
    dtype = next(model.parameters()).dtype
    mcfg = moe_megatron_config(moe, model.cfg, cfg.tp, cfg.sp, cfg.pp, cfg.ep, cfg.etp, dtype)
    for i, block in enumerate(model.layers):
        if isinstance(block.mlp, MoE):
            block.mlp = ParallelMoE(block.mlp, f"layers.{i}.mlp", mcfg, groups, cfg.tp, cfg.etp)


def set_aux_scale(cfg, total_tokens: int) -> None:
    """The gradient scale of the balancing and z-losses for a step of `total_tokens` tokens: megatron
    attaches each rank's loss share times its local token count (b T / (sp tp)); this makes their sum the
    per-microbatch loss over the microbatches x DP ranks (see the module doc)."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(cfg.tp * cfg.sp / total_tokens, dtype=torch.float64))


def routers(module: nn.Module) -> list[tuple[int, _Router]]:
    """(layer index, router) of every MoE layer in `module` (a stage: global layer indices)."""
    out = []
    for m in module.modules():
        if isinstance(m, ParallelMoE):
            name = m.layer.router.weight.full_name  # layers.{i}.mlp.router.weight
            out.append((int(name.split(".")[1]), m.layer.router))
    return out


@torch.no_grad()
def moe_step(
    stage: nn.Module, cfg, moe_cfg: MoEConfig | None, num_layers: int, total_tokens: int, update_bias: bool = True
) -> dict | None:
    """After a training step: the MoE layers' statistics summed over every rank, the expert biases moved
    (model.moe.expert_bias; not when `update_bias` is False: a skipped step), the counts reset. Returns
    {"aux_loss": [per layer], "z_loss": [per layer],
    "load_max_mean": [per layer: max / mean tokens per expert]} (None for dense layers) on every rank, or
    None without MoE layers. `cfg` the ParallelConfig; one all-reduce over the world."""
    mine = routers(stage)
    if moe_cfg is None:
        return None
    e = moe_cfg.num_experts
    table = torch.zeros(num_layers, e + 3, dtype=torch.float64)
    for layer, r in mine:
        table[layer, :e], table[layer, e], table[layer, e + 1], table[layer, e + 2] = r.load, r.aux_sum, r.z_sum, 1
    dist.all_reduce(table)
    per_mb = cfg.dp * cfg.microbatches
    out = {"aux_loss": [], "z_loss": [], "load_max_mean": []}
    for layer in range(num_layers):
        row = table[layer]
        if row[e + 2] == 0:
            for k in out:
                out[k].append(None)
            continue
        load = row[:e]
        out["aux_loss"].append(float(row[e] / per_mb))
        out["z_loss"].append(float(row[e + 1] / total_tokens))
        out["load_max_mean"].append(float(load.max() / load.mean()) if load.sum() > 0 else None)
    for layer, r in mine:
        if r.expert_bias is not None and update_bias:
            load = table[layer, :e].float()
            r.expert_bias += torch.sign(load.mean() - load).to(r.expert_bias) * moe_cfg.bias_update_rate
        r.load.zero_()
        r.aux_sum.zero_()
        r.z_sum.zero_()
    return out
