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
    ep: object = None
    """Expert-parallel group (of one rank when ep = 1): ep consecutive ranks of the DP x SP ranks of one TP rank and
    stage, SP fastest; the MoE layers' all-to-all runs over it."""
    expt_dp: object = None
    """Ranks holding the same experts (their gradients are summed over it): the DP x SP ranks with the same
    EP rank, and with parallel.etp = 1 the TP ranks too (each holds every expert whole)."""
    expt_tp: object = None
    """Expert tensor parallelism: the TP group when parallel.etp = tp > 1, else None."""
    tp_ep: object = None
    """expt_tp x ep, expert TP fastest (megatron's dispatcher gathers token counts over it)."""
    tp_sp: object = None
    """TP x SP: the ranks that split one sequence's tokens between them in the MoE layers (the balancing
    statistics are summed over it)."""
    stage: object = None
    """TP x SP x DP: every rank of this pipeline stage."""
    ep_rank: int = 0


_current: tuple | None = None


def _release_groups() -> None:
    """Destroy the process groups of a previous mesh (each holds threads and sockets), then megatron's
    record of them."""
    seen = set()
    for value in [*vars(ps).values(), *_expert_groups.values()]:
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
    sizes = (cfg.tp, cfg.sp, cfg.pp, cfg.ep, cfg.etp, timeout_s)
    if _current != sizes or _stale():
        _release_groups()
        _expert_groups.clear()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            context_parallel_size=cfg.sp,
            order="tp-cp-ep-dp-pp",
            create_gloo_process_groups=False,  # the default backend already is gloo on CPU
            **({} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}),
        )
        _current = sizes
    if not _expert_groups:
        _expert_groups.update(_make_expert_groups(cfg, timeout_s))
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
        tp_sp=ps.get_tensor_and_context_parallel_group(),
        stage=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        **_expert_groups,
    )


_expert_groups: dict = {}


def _make_expert_groups(cfg: ParallelConfig, timeout_s: float | None) -> dict:
    """The EP, expert-DP, expert-TP and expert-TP x EP groups of this rank (every rank creates every group,
    in the same order, as torch.distributed requires)."""
    import datetime

    from lasp.parallel.mesh import Coord, coords, ep_groups

    if cfg.ep == 1:
        expt_tp = ps.get_tensor_model_parallel_group() if cfg.etp > 1 else None
        expt_dp = (
            ps.get_data_parallel_group(with_context_parallel=True)
            if cfg.etp > 1 or cfg.tp == 1
            else ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        )
        # megatron's EP groups of one rank (its expert model parallel size is 1 here)
        ep = ps.get_expert_model_parallel_group()
        return dict(ep=ep, expt_dp=expt_dp, expt_tp=expt_tp, tp_ep=expt_tp or ep, ep_rank=0)
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    me, mine = dist.get_rank(), {}
    where = coords(cfg)
    rank_of = {c: r for r, c in enumerate(where)}
    dp_sp = [(dp, sp) for dp in range(cfg.dp) for sp in range(cfg.sp)]  # SP fastest, as megatron's CP
    for ranks in ep_groups(cfg):
        g = dist.new_group(ranks, **kw)
        if me in ranks:
            mine["ep"], mine["ep_rank"] = g, ranks.index(me)
    for pp in range(cfg.pp):
        # expert data parallel: the same EP rank (and with etp = 1 any TP rank)
        for tps in [[t] for t in range(cfg.tp)] if cfg.etp > 1 else [list(range(cfg.tp))]:
            for j in range(cfg.ep):
                ranks = sorted(
                    rank_of[Coord(tp, sp, dp, pp)] for tp in tps for k, (dp, sp) in enumerate(dp_sp) if k % cfg.ep == j
                )
                g = dist.new_group(ranks, **kw)
                if me in ranks:
                    mine["expt_dp"] = g
        # expert TP x EP, expert TP fastest
        if cfg.etp > 1:
            for i in range(0, len(dp_sp), cfg.ep):
                ranks = [rank_of[Coord(tp, sp, dp, pp)] for dp, sp in dp_sp[i : i + cfg.ep] for tp in range(cfg.tp)]
                g = dist.new_group(ranks, **kw)
                if me in ranks:
                    mine["tp_ep"] = g
    mine["expt_tp"] = ps.get_tensor_model_parallel_group() if cfg.etp > 1 else None
    mine.setdefault("tp_ep", mine["ep"])
    return mine
