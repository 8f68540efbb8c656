"""Single-device Linear-Llama. Parallelism is applied afterwards by lasp.parallel."""

from lasp.model.config import ModelConfig
from lasp.model.decode import DecodeMemory, DecodeState, decode_memory, decode_step, generate, sample
from lasp.model.hf import HFImportError, from_hf
from lasp.model.llama import Block, LinearAttention, LinearLlama, SoftmaxAttention, lm_loss_sum
from lasp.model.loss import chunked_lm_loss_sum
from lasp.model.pretrained import PretrainedError, from_pretrained, save_pretrained

__all__ = [
    "Block",
    "DecodeMemory",
    "DecodeState",
    "HFImportError",
    "LinearAttention",
    "LinearLlama",
    "ModelConfig",
    "PretrainedError",
    "SoftmaxAttention",
    "chunked_lm_loss_sum",
    "decode_memory",
    "decode_step",
    "from_hf",
    "from_pretrained",
    "generate",
    "lm_loss_sum",
    "sample",
    "save_pretrained",
]
