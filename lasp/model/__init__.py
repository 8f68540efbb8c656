"""Single-device Linear-Llama. Parallelism is applied afterwards by lasp.parallel."""

from lasp.model.config import ModelConfig
from lasp.model.llama import Block, LinearAttention, LinearLlama, SoftmaxAttention, lm_loss_sum
from lasp.model.loss import chunked_lm_loss_sum

__all__ = [
    "Block", "LinearAttention", "LinearLlama", "ModelConfig", "SoftmaxAttention", "chunked_lm_loss_sum",
    "lm_loss_sum",
]
