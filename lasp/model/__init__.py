"""Single-device Linear-Llama. Parallelism is applied afterwards by lasp.parallel."""

from lasp.model.config import ModelConfig
from lasp.model.llama import Block, LinearAttention, LinearLlama, SoftmaxAttention, lm_loss_sum

__all__ = ["Block", "LinearAttention", "LinearLlama", "ModelConfig", "SoftmaxAttention", "lm_loss_sum"]
