"""Pipeline parallelism: split the layers into stages and run megatron-core's schedules over them.

Between stages megatron sends [T, B, hidden] tensors; a stage keeps the model's [B, T, hidden] inside.
"""

import contextlib

import torch
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor, nn

from lasp.model.llama import LinearLlama
from lasp.parallel.cpu_shims import cuda_to_cpu
from lasp.parallel.loss import LMHeadLoss


class PipelineStage(nn.Module):
    """Layers [first, last) of a model, with the embedding on stage 0 and the head on the last stage.

    The last stage returns the final normed hidden states [B, T, hidden]: its LM head runs inside the
    chunked loss `head_loss` (see `loss_sum_fn`), which never builds the logits of the whole sequence.
    `logits=True` makes it return the logits [B, T, vocab (local shard under TP)] instead.
    """

    def __init__(self, model: LinearLlama, stage: int, num_stages: int, config, logits: bool = False):
        super().__init__()
        per = model.cfg.num_layers // num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.logits = logits
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleList(model.layers[stage * per : (stage + 1) * per])
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.head_loss = LMHeadLoss() if self.is_last and not logits else None
        self.config = config  # read by megatron's schedules, with model_type
        self.model_type = ModelType.encoder_or_decoder
        self._input: Tensor | None = None
        if model.cfg.tie_embeddings and num_stages > 1:
            for p in (self.embed.weight if self.is_first else None, self.lm_head.weight if self.is_last else None):
                if p is not None:
                    p.shared_embedding = True

    def set_input_tensor(self, tensor) -> None:
        self._input = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, tokens: Tensor, positions: Tensor, documents=None) -> Tensor:
        x = self.embed(tokens) if self.is_first else self._input.transpose(0, 1)
        for layer in self.layers:
            x = layer(x, positions, documents)
        if self.is_last:
            return self.lm_head(self.norm(x)) if self.logits else self.norm(x)
        return x.transpose(0, 1).contiguous()


def forward_backward(
    stage: nn.Module,
    microbatches: list[dict],
    seq_len: int,
    loss_sum_fn,
    total_tokens: int,
    forward_only: bool = False,
) -> Tensor | None:
    """One forward and backward over `microbatches` (dicts of local tokens, positions, labels) with
    megatron's schedule (1F1B when pp > 1); `stage` is a PipelineStage or its DataParallel wrapper, whose
    hooks in stage.config the schedule calls. Each microbatch contributes its loss sum / `total_tokens`,
    so gradients summed over all ranks are those of the global mean loss. Returns that rank's share of the
    loss on the last stage, None elsewhere. `forward_only`: no backward (run it under torch.no_grad)."""

    def step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], mb["positions"], mb.get("documents"))

        def loss_func(output: Tensor):
            loss = loss_sum_fn(output, mb["labels"]) / total_tokens
            return loss, torch.tensor(int((mb["labels"] != -100).sum())), {"loss": loss.detach()}

        return out, loss_func

    fb = get_forward_backward_func()
    with cuda_to_cpu() or contextlib.nullcontext():
        out = fb(
            forward_step_func=step,
            data_iterator=iter(microbatches),
            model=[stage],
            num_microbatches=len(microbatches),
            seq_length=seq_len,
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
    return sum(d["loss"] for d in out) if stage.is_last else None
