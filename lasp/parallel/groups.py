"""The TP x SP x PP x DP mesh from megatron-core's parallel_state (SP is its context-parallel group),
handed around as one small dataclass of explicit groups."""

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state as ps

from lasp.parallel.config import ParallelConfig


@dataclass
class ParallelGroups:
    tp: object
    sp: object
    pp: object
    dp: object
    dp_sp: object
    """Ranks holding the same parameters: gradients are summed over it."""
    embedding: object
    """First and last pipeline stage (tied embeddings are summed over it)."""
    tp_rank: int
    sp_rank: int
    pp_rank: int
    dp_rank: int


def init_groups(cfg: ParallelConfig) -> ParallelGroups:
    """Build the mesh on the initialised default group (rank order tp-cp-ep-dp-pp, megatron's default)."""
    if not dist.is_initialized():
        raise RuntimeError("init_groups needs torch.distributed initialised (torchrun or init_process_group)")
    if dist.get_world_size() != cfg.world_size:
        raise ValueError(
            f"world size {dist.get_world_size()} != tp x sp x pp x dp = {cfg.tp} x {cfg.sp} x {cfg.pp} x {cfg.dp}"
        )
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.sp,
        order="tp-cp-ep-dp-pp",
    )
    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        sp=ps.get_context_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_sp=ps.get_data_parallel_group(with_context_parallel=True),
        embedding=ps.get_embedding_group() if cfg.pp > 1 else None,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        sp_rank=ps.get_context_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )
