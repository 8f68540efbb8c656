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
    """First and last pipeline stage (tied embeddings are summed over it); None on the other stages and
    when pp = 1."""
    tp_rank: int
    sp_rank: int
    pp_rank: int
    dp_rank: int


_current: tuple | None = None


def _release_groups() -> None:
    """Destroy the process groups of a previous mesh (each holds threads and sockets), then megatron's
    record of them."""
    seen = set()
    for value in vars(ps).values():
        for g in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(g, dist.ProcessGroup) and id(g) not in seen and g != dist.group.WORLD:
                seen.add(id(g))
                try:
                    dist.destroy_process_group(g)
                except (ValueError, RuntimeError):
                    pass  # not a group this rank belongs to
    ps.destroy_model_parallel()
    # destroy_model_parallel (megatron-core 0.16) keeps these: a middle stage of the next mesh would still
    # count itself in the embedding group of the previous one
    ps._EMBEDDING_GLOBAL_RANKS = None
    ps._PIPELINE_GLOBAL_RANKS = None


def _stale() -> bool:
    """True when megatron's groups belong to a default group that was destroyed since (a second run in
    the same process)."""
    try:
        dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
        return False
    except (ValueError, RuntimeError, AssertionError, KeyError):
        return True


def init_groups(cfg: ParallelConfig, timeout_s: float | None = None) -> ParallelGroups:
    """Build the mesh on the initialised default group (rank order tp-cp-ep-dp-pp, megatron's default).
    Every group's collectives time out after `timeout_s` seconds (None: megatron's 30 minutes).

    Calling it again with the same tp/sp/pp sizes and timeout reuses the groups; others replace them."""
    global _current
    if not dist.is_initialized():
        raise RuntimeError("init_groups needs torch.distributed initialised (torchrun or init_process_group)")
    if dist.get_world_size() != cfg.world_size:
        raise ValueError(
            f"world size {dist.get_world_size()} != tp x sp x pp x dp = {cfg.tp} x {cfg.sp} x {cfg.pp} x {cfg.dp}"
        )
    sizes = (cfg.tp, cfg.sp, cfg.pp, timeout_s)
    if _current != sizes or _stale():
        _release_groups()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            context_parallel_size=cfg.sp,
            order="tp-cp-ep-dp-pp",
            create_gloo_process_groups=False,  # the default backend already is gloo on CPU
            **({} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}),
        )
        _current = sizes
    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        sp=ps.get_context_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_sp=ps.get_data_parallel_group(with_context_parallel=True),
        # middle stages (pp >= 3) are not in it: megatron has no embedding group for them
        embedding=ps.get_embedding_group() if cfg.pp > 1 and ps.is_rank_in_embedding_group() else None,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        sp_rank=ps.get_context_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )
