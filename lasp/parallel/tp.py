"""Tensor parallelism with megatron-core layers, applied to a built single-device model.

Each nn.Linear / nn.Embedding is replaced by its megatron-core counterpart holding this rank's shard of
the SAME weights, so a parallel model starts exactly where the single-device one does:
q/k/v, gate/up and the LM head are column-parallel (heads, MLP width and vocabulary split), o and down
are row-parallel, the embedding is vocab-parallel, and the loss is a vocab-parallel cross-entropy.
Parameters whose gradient covers only the local heads (the per-head output norm) are marked
`tp_partial_grad` so the gradient sync sums them over the TP group. LoRA adapters follow their layer
(`_LoRA`).
"""

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import Tensor, nn

from lasp.model.llama import DeltaNetAttention, LinearAttention, LinearLlama
from lasp.model.lora import LoRALinear
from lasp.model.moe import MoE


class _Megatron(nn.Module):
    """Drops the (output, bias) tuple of a megatron linear layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)[0]


def _shard(w: Tensor, dim: int, rank: int, size: int) -> Tensor:
    return w.chunk(size, dim=dim)[rank]


def _adopt(new: nn.Parameter, old: nn.Parameter, dim: int, rank: int, size: int) -> None:
    """Copy this rank's shard of `old` into `new` and remember where it came from (`full_name`, `tp_dim`)."""
    with torch.no_grad():
        new.copy_(_shard(old, dim, rank, size))
    new.full_name = getattr(old, "full_name", None)
    new.tp_dim = dim


class _LoRA(nn.Module):
    """A megatron layer plus this rank's part of a LoRA adapter (lasp.model.lora).

    Column-parallel (q, k, v, gate, up): A [r, in] whole on every rank, B split by output rows like the
    weight; the input goes through copy-to-TP-region so its gradient is summed over the ranks, and A's
    gradient (each rank sees its rows of B) is marked `tp_partial_grad`. Row-parallel (o, down), the mirror:
    A split by input columns like the weight, A x all-reduced, B whole (its gradient is the same on every
    rank)."""

    def __init__(self, base: _Megatron, lin: nn.Linear, column: bool, group, rank: int, size: int):
        super().__init__()
        self.base, self.column, self.group, self.scaling = base, column, group, lin.scaling
        self.lora_A = nn.Parameter(torch.empty_like(_shard(lin.lora_A, 1, rank, size) if not column else lin.lora_A))
        self.lora_B = nn.Parameter(torch.empty_like(_shard(lin.lora_B, 0, rank, size) if column else lin.lora_B))
        if column:
            _adopt(self.lora_B, lin.lora_B, 0, rank, size)
            _whole(self.lora_A, lin.lora_A)
            self.lora_A.tp_partial_grad = True
        else:
            _adopt(self.lora_A, lin.lora_A, 1, rank, size)
            _whole(self.lora_B, lin.lora_B)

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        if self.column:
            z = F.linear(copy_to_tensor_model_parallel_region(x, group=self.group), self.lora_A)
        else:
            z = reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_A), group=self.group)
        return self.base(x) + F.linear(z, self.lora_B) * self.scaling


def _whole(new: nn.Parameter, old: nn.Parameter) -> None:
    with torch.no_grad():
        new.copy_(old)
    new.full_name, new.tp_dim = getattr(old, "full_name", None), None


def _column(lin: nn.Linear, cfg: ModelParallelConfig, group, rank: int, size: int) -> _Megatron:
    layer = tensor_parallel.ColumnParallelLinear(
        lin.in_features,
        lin.out_features,
        config=cfg,
        init_method=nn.init.zeros_,
        bias=lin.bias is not None,
        gather_output=False,
        tp_group=group,
    )
    _adopt(layer.weight, lin.weight, 0, rank, size)
    if lin.bias is not None:  # Qwen2's q/k/v biases split with their heads
        _adopt(layer.bias, lin.bias, 0, rank, size)
    return _LoRA(_Megatron(layer), lin, True, group, rank, size) if isinstance(lin, LoRALinear) else _Megatron(layer)


def _split_parameter(module: nn.Module, name: str, rank: int, size: int) -> None:
    """Replace the parameter `name` of `module` by this rank's shard along dim 0 (heads or channels)."""
    old = getattr(module, name)
    new = nn.Parameter(_shard(old.detach(), 0, rank, size).clone())
    new.full_name, new.tp_dim = getattr(old, "full_name", None), 0
    if hasattr(old, "no_weight_decay"):
        new.no_weight_decay = old.no_weight_decay
    setattr(module, name, new)


def _row(lin: nn.Linear, cfg: ModelParallelConfig, group, rank: int, size: int) -> _Megatron:
    layer = tensor_parallel.RowParallelLinear(
        lin.in_features,
        lin.out_features,
        config=cfg,
        init_method=nn.init.zeros_,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=group,
    )
    _adopt(layer.weight, lin.weight, 1, rank, size)
    return _LoRA(_Megatron(layer), lin, False, group, rank, size) if isinstance(lin, LoRALinear) else _Megatron(layer)


def megatron_config(tp: int, pp: int, sp: int, dtype: torch.dtype, hidden: int, num_layers: int, heads: int):
    """The megatron-core config the layers and the pipeline schedules read."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,
        batch_p2p_sync=False,
        deallocate_pipeline_outputs=False,
    )


def apply_tp(model: LinearLlama, cfg: ModelParallelConfig, group, rank: int, size: int) -> None:
    """Swap `model`'s layers for this TP rank's shards, in place."""
    if size == 1:
        return
    for block in model.layers:
        mixer, mlp = block.mixer, block.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(mixer, name, _column(getattr(mixer, name), cfg, group, rank, size))
        mixer.o_proj = _row(mixer.o_proj, cfg, group, rank, size)
        for norm in (getattr(mixer, "q_norm", None), getattr(mixer, "k_norm", None)):
            if norm is not None:  # Qwen3's per-head q/k norms: one weight shared by the local heads
                norm.weight.tp_partial_grad = True
        if getattr(mixer, "router", None) is not None:
            # MoM: every rank routes alike; the weights' gradient from each rank's heads is summed
            mixer.router.grad_sum = partial(copy_to_tensor_model_parallel_region, group=group)
        if isinstance(mixer, DeltaNetAttention):
            # the convolutions' channels, beta, the gate and the output gate follow the heads of q, k, v (each
            # head's DeltaProduct steps and MoM memories with it: lasp.model.llama._widen_kv)
            for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
                _split_parameter(conv, "weight", rank, size)
            for name in ("b_proj", "g_proj") + (("a_proj",) if mixer.a_proj is not None else ()):
                setattr(mixer, name, _column(getattr(mixer, name), cfg, group, rank, size))
            if mixer.a_proj is not None:
                _split_parameter(mixer, "A_log", rank, size)
                _split_parameter(mixer, "dt_bias", rank, size)
            mixer.out_norm.weight.tp_partial_grad = True
        if isinstance(mixer, LinearAttention):
            for fmap in (mixer.feature_q, mixer.feature_k):
                if fmap is not None:  # Hedgehog's per-head weights follow the heads of q and k
                    _split_parameter(fmap, "weight", rank, size)
            if mixer.window_share is not None:
                _split_parameter(mixer, "window_share", rank, size)
            if mixer.log_decay is not None:
                mixer.log_decay = _shard(mixer.log_decay, 0, rank, size).clone()
            if mixer.out_norm is not None:
                mixer.out_norm.weight.tp_partial_grad = True
            if mixer.gate is not None:
                # the last projection splits by heads like q. GLA's low-rank one stays whole on every rank:
                # the column-parallel layer after it all-reduces its input gradient, so its gradient is whole
                mixer.gate.proj = _column(mixer.gate.proj, cfg, group, rank, size)
        if isinstance(mlp, MoE):  # the routed experts are lasp.parallel.ep's; the shared one splits like an MLP
            mlp = mlp.shared
        if mlp is not None:
            mlp.gate_proj = _column(mlp.gate_proj, cfg, group, rank, size)
            mlp.up_proj = _column(mlp.up_proj, cfg, group, rank, size)
            mlp.down_proj = _row(mlp.down_proj, cfg, group, rank, size)
    tied = model.cfg.tie_embeddings
    emb = tensor_parallel.VocabParallelEmbedding(
        model.embed.num_embeddings, model.embed.embedding_dim, init_method=nn.init.zeros_, config=cfg, tp_group=group
    )
    _adopt(emb.weight, model.embed.weight, 0, rank, size)
    model.lm_head = _column(model.lm_head, cfg, group, rank, size)
    model.embed = emb
    if tied:
        model.lm_head.layer.weight = emb.weight


def vocab_parallel_loss_sum(logits: Tensor, labels: Tensor, group, rank: int) -> Tensor:
    """Summed cross-entropy of vocab-sharded logits [B, T, V/tp] (labels -100 are ignored).

    megatron-core's vocab_parallel_cross_entropy computes in float32 whatever the input; this keeps
    float64 (and upcasts half precision), so TP matches one process to float64 rounding. Every TP rank
    computes the same loss; the all-reduces pass gradients straight through (megatron's convention).
    """
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    vocab_local = lf.shape[-1]
    m = lf.detach().amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sum_exp = reduce_from_tensor_model_parallel_region(torch.exp(lf - m[..., None]).sum(-1), group=group)
    local = labels - rank * vocab_local
    mine = (local >= 0) & (local < vocab_local)
    target = lf.gather(-1, local.clamp(0, vocab_local - 1)[..., None]).squeeze(-1) * mine
    target = reduce_from_tensor_model_parallel_region(target, group=group)
    return ((m + torch.log(sum_exp) - target) * (labels != -100)).sum()
