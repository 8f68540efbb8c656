"""The training loop, in one sitting (docs/design.md, "The trainer").

config -> process groups -> the checkpoint to resume (if any) -> the same model on every rank ->
parallelize -> load the checkpoint -> for each step: this rank's microbatches of batch `step` ->
forward/backward/sync -> clip -> step -> metrics -> eval every k steps -> checkpoint every k steps
-> stop on SIGTERM/SIGINT/train.max_minutes (every rank at the same step, after a checkpoint)
"""

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from lasp.data import TokenData, local_microbatches
from lasp.distributed.timeouts import named_timeouts
from lasp.kernels import get_kernel
from lasp.kernels.protocol import Capabilities
from lasp.model import LinearLlama
from lasp.model.variants import VARIANTS
from lasp.parallel import (
    ParallelGroups,
    attention_transfer,
    clip_grad_norm_,
    distillation,
    eval_step,
    forward_backward_step,
    init_groups,
    loss_sum_fn,
    parallelize,
    zero_engine,
    zero_eval_step,
    zero_train_step,
)
from lasp.parallel.ac import apply_ac
from lasp.parallel.ep import moe_step
from lasp.parallel.sp import apply_kernel
from lasp.train import ckpt_store
from lasp.train.checkpoint import Checkpointer, checkpoint_root, compatibility
from lasp.train.ckpt_store import CheckpointError
from lasp.train.config import ConfigError, TrainConfig, dump
from lasp.train.distributed import Launch, init_distributed, pick_device, shutdown
from lasp.train.flops import flops_per_token, peak_flops
from lasp.train.metrics import Metrics, keep_rows_after, moe_columns, peak_memory_gib
from lasp.train.optim import build_optimizer, lr_at, set_lr
from lasp.train.run_lock import RunDirLocked, RunLock
from lasp.train.signals import GracefulStop
from lasp.train.state import TrainState


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm with train.nonfinite = stop (raised on every rank at once)."""


def _needs(cfg: TrainConfig) -> Capabilities:
    """What the model's linear layers and the data ask of the kernel."""
    variant = VARIANTS[cfg.model.linear_variant]
    if not any(cfg.model.mixer(i) == "L" for i in range(cfg.model.num_layers)):
        return Capabilities()
    return Capabilities(
        gates=() if variant.gate == "none" or variant.delta else (variant.gate,),
        resets=cfg.data.reset_at_documents,
        delta=variant.delta,
    )


def _check_kernel(cfg: TrainConfig, kernel) -> None:
    """What the model and the data ask of the linear-attention kernel (`_needs`), before any process group."""
    problems, needs, caps = [], _needs(cfg), kernel.caps
    lacks = f"which the {kernel.name!r} kernel lacks (train.kernel={cfg.train.kernel}); set train.kernel=torch"
    for form in needs.gates:
        if form not in caps.gates:
            problems.append(f"model.linear_variant {cfg.model.linear_variant} needs a {form} gate, {lacks}")
    if needs.delta and not caps.delta:
        problems.append(f"model.linear_variant {cfg.model.linear_variant} needs the delta rule, {lacks}")
    if needs.resets and not caps.resets:
        problems.append(f"data.reset_at_documents needs document resets, {lacks}")
    if problems:
        raise ConfigError("the kernel", problems)


def train(cfg: TrainConfig, launch: Launch) -> TrainState:
    """Run `cfg` on this process (one rank of the launched world). Returns the final train state. A
    process group that already exists is used and left alone; otherwise one is made and destroyed."""
    device = pick_device(cfg.train.device, launch)
    kernel = get_kernel(cfg.train.kernel, _needs(cfg))  # triton or fla without a GPU fail here, before any group
    _check_kernel(cfg, kernel)
    owned = not dist.is_initialized()
    init_distributed(launch, device, cfg.train.collective_timeout_s)
    clean = False
    try:
        state = _train(cfg, device, kernel)
        clean = True
        return state
    finally:
        if owned:
            shutdown(clean)


@dataclass
class _Run:
    """What the set-up built, handed to the step and the evaluation."""

    stage: nn.Module
    """This rank's pipeline stage (wrapped for DDP), or the module inside the ZeRO engine."""
    engine: object | None
    """The DeepSpeed engine with ZeRO (it clips and steps inside zero_train_step), else None."""
    optimizer: torch.optim.Optimizer
    groups: ParallelGroups
    batch: Callable
    """(TokenData, step=..., shuffle=...) -> this rank's microbatches of global batch `step`."""
    autocast: Callable
    device: torch.device
    position_rows: torch.Tensor = torch.empty(0)
    """Held-out rows inside one document for train.eval_positions (none: not asked for)."""


def _resume_path(cfg: TrainConfig, tokenizer: dict) -> tuple[str | None, int, list[str]]:
    """The checkpoint every rank resumes from (None: a fresh start), its step, and notes on what changed.
    Every rank looks (a shared filesystem); they must agree, or every rank raises. The ranks share the
    checksum reading: each hashes its part of the files, and a damage any rank finds stops them all."""
    path, problems, notes, step = None, [], [], 0
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        path = ckpt_store.resolve_resume(cfg.train.resume, checkpoint_root(cfg), checksums=False)
    except CheckpointError as e:
        problems = [str(e)]
    seen = [None] * world
    dist.all_gather_object(seen, path)
    if len(set(seen)) > 1:
        raise CheckpointError(
            "ranks disagree on the checkpoint to resume from (is checkpoint.dir on a filesystem "
            "every node sees?): " + "; ".join(f"rank {r}: {s}" for r, s in enumerate(seen))
        )
    if path is not None and not problems:
        try:
            if cfg.checkpoint.verify:
                ckpt_store.verify(path, checksums=True, part=(rank, world))
            problems, notes = compatibility(path, cfg, tokenizer)
            step = int(ckpt_store.read_state(path)["state"]["step"]) if not problems else 0
        except CheckpointError as e:
            problems = [str(e)]
    everyone = [None] * world
    dist.all_gather_object(everyone, problems)
    problems = list(dict.fromkeys(p for ps in everyone for p in ps))
    if problems:
        where = f"checkpoint {path}" if path else f"train.resume = {cfg.train.resume}"
        raise CheckpointError(f"{where} cannot be loaded into this run:\n  " + "\n  ".join(problems))
    return path, step, notes


def _lock_run(cfg: TrainConfig) -> list[RunLock]:
    """Rank 0 takes the locks of the run directory and of checkpoint.dir (its own lock even inside the run
    directory: another run may name it as its checkpoint.dir) before anything there is written or removed;
    every rank raises RunDirLocked if another run holds one."""
    dirs = [cfg.logging.run_dir]
    if os.path.abspath(checkpoint_root(cfg)) != os.path.abspath(cfg.logging.run_dir):
        dirs.append(checkpoint_root(cfg))
    locks, error, notes = [], None, []
    if dist.get_rank() == 0:
        try:
            for d in dirs:
                lock = RunLock(d)
                note = lock.acquire()
                locks.append(lock)
                notes += [note] if note else []
        except (RunDirLocked, OSError) as e:
            for lock in locks:
                lock.release()
            locks, error = [], str(e) if isinstance(e, RunDirLocked) else f"cannot lock {d}: {e.strerror or e}"
        for note in notes:
            print(note, flush=True)
    seen = [error]
    dist.broadcast_object_list(seen, src=0)
    if seen[0] is not None:
        raise RunDirLocked(seen[0])
    return locks


def _roll_back(cfg: TrainConfig, resume: str, step: int, say) -> None:
    """An explicit train.resume to a step older than the newest under checkpoint.dir: the later steps are
    the abandoned branch; rank 0 moves them aside so that saves and a plain restart follow the new one."""
    if cfg.train.resume in ("auto", "never") or dist.get_rank() != 0:
        return
    moved = ckpt_store.set_aside(checkpoint_root(cfg), step)
    if moved is not None:
        aside, names = moved
        rows = keep_rows_after(cfg.logging.run_dir, step, aside)
        inside = os.path.dirname(os.path.realpath(resume)) == os.path.realpath(checkpoint_root(cfg))
        start = (
            f"rolling back to step {step} ({resume})"
            if inside
            else f"starting from step {step} of {resume}, outside checkpoint.dir"
        )
        say(
            f"{start}: the later {', '.join(names)} of the abandoned branch are "
            f"moved to {aside}"
            + (f" with its {rows} metrics rows" if rows else "")
            + " (kept, not read again; a plain restart continues from this branch)"
        )


def _initialise(model: LinearLlama, path: str) -> tuple[int, int]:
    """Load train.init_from's weights into the full model (before it is parallelised); (loaded, new) counts.
    The config check compared the source's tokenizer with the data's; a source without one is said here."""
    import logging

    from lasp.model.hf import HFImportError, initial_state
    from lasp.model.pretrained import TOKENIZER, recorded_tokenizer

    if recorded_tokenizer(path) is None and not os.path.isfile(os.path.join(path, TOKENIZER)):
        logging.getLogger(__name__).info(
            f"train.init_from {path} records no tokenizer (no lasp.export record, no {TOKENIZER}): only its "
            f"vocabulary size ({model.cfg.vocab_size}) was checked against the data's, not which tokenizer made it"
        )
    try:  # the config check read the files' headers; what changed since (or a dry run's skip) is said here
        state = initial_state(path, model.cfg)
    except HFImportError as e:
        raise ConfigError("train.init_from", [str(e)]) from None
    own = model.state_dict()
    wrong = [
        f"{k}: {list(v.shape)} there, {list(own[k].shape)} here"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ConfigError("train.init_from", wrong)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    aliases = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    return len(state), len([k for k in own if k not in state and k not in aliases])


def build_stage(
    cfg: TrainConfig,
    groups: ParallelGroups,
    device: torch.device,
    kernel,
    init_from: str = "",
    say=lambda message: None,
):
    """This rank's part of the model, its optimizer, and the ZeRO engine (or None): (stage, optimizer, engine).
    `init_from`: the weights to start from (train.init_from), loaded into the full model before it is
    split, so any layout starts from them."""
    p = cfg.parallel
    torch.manual_seed(cfg.train.seed)  # the same full model on every rank; parallelize keeps its shard
    model = LinearLlama(cfg.model).to(device)
    if init_from:
        loaded, new = _initialise(model, init_from)
        say(f"initialised from {init_from}: {loaded} tensors loaded, {new} new (initialised fresh)")
    frozen = frozenset()
    if cfg.train.trainable == "new":  # also when resuming: the same parameters train as before
        from lasp.model.hf import provided

        frozen = frozenset(provided(cfg.train.init_from, cfg.model))
        n = sum(p.numel() for name, p in model.named_parameters() if name not in frozen)
        say(f"train.trainable = new: {n:,} parameters train, the {len(frozen)} imported tensors are frozen")
    elif cfg.train.trainable == "lora":
        frozen = frozenset(name for name, _ in model.named_parameters() if not name.endswith((".lora_A", ".lora_B")))
        n = sum(p.numel() for name, p in model.named_parameters() if name not in frozen)
        say(f"train.trainable = lora: {n:,} adapter parameters train, the other {len(frozen)} tensors are frozen")
    apply_ac(model, cfg.train.checkpoint_every)
    stage = parallelize(model, p, groups, frozen)
    if cfg.train.objective == "attention_transfer":
        n = len(attention_transfer(getattr(stage, "module", stage)))  # the stage inside DataParallel
        say(
            f"train.objective = attention_transfer: the loss is the squared error of {n} linear layer(s) "
            "against their own softmax attention"
        )
    if cfg.train.distill_weight:
        distillation(getattr(stage, "module", stage), cfg.train.distill_weight)
        say(
            f"train.distill_weight = {cfg.train.distill_weight}: the training loss adds the KL to the original "
            "softmax model (the evaluation's is the LM loss alone)"
        )
    apply_kernel(stage, kernel)
    optimizer = build_optimizer(stage, cfg.optim, device)
    rows = cfg.data.global_batch // p.dp // p.microbatches
    engine = zero_engine(stage, optimizer, p, groups, rows, cfg.optim.grad_clip) if p.zero_stage else None
    return stage, optimizer, engine


def _train(cfg: TrainConfig, device: torch.device, kernel) -> TrainState:
    # from the start: a SIGTERM while the model is built or a checkpoint loads stops after the first step
    stop = GracefulStop(device)
    try:
        return _setup_and_loop(cfg, device, kernel, stop)
    finally:
        stop.restore()


def _setup_and_loop(cfg: TrainConfig, device: torch.device, kernel, stop: GracefulStop) -> TrainState:
    locks = _lock_run(cfg)
    try:
        return _locked(cfg, device, kernel, stop)
    finally:
        for lock in locks:
            lock.release()


def _locked(cfg: TrainConfig, device: torch.device, kernel, stop: GracefulStop) -> TrainState:
    p, groups = cfg.parallel, init_groups(cfg.parallel, cfg.train.collective_timeout_s)
    data = TokenData(cfg.data.path, "train")
    resume, resume_step, notes = _resume_path(cfg, data.meta["tokenizer"])
    if resume:
        _roll_back(cfg, resume, resume_step, lambda m: print(m, flush=True))
    metrics = Metrics(
        cfg.logging.run_dir,
        dist.get_rank() == 0,
        cfg.train.steps,
        cfg.logging.progress,
        cfg.logging.tensorboard,
        resume_step=resume_step if resume else None,
    )
    metrics.message(f"run directory: {os.path.abspath(cfg.logging.run_dir)}")
    if metrics.enabled:
        with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
            f.write(dump(cfg))

    stage, optimizer, engine = build_stage(
        cfg, groups, device, kernel, "" if resume else cfg.train.init_from, metrics.message
    )
    metrics.message(
        f"{dist.get_world_size()} rank(s) on {device.type}, tp={p.tp} sp={p.sp} ({p.sp_layout}) "
        f"pp={p.pp} dp={p.dp}, kernel {kernel.name}, {cfg.train.dtype}\nlayout: {cfg.layout_why}"
    )
    metrics.log_layout(
        resume_step if resume else 0,
        {
            "world_size": dist.get_world_size(),
            **{k: getattr(p, k) for k in ("tp", "sp", "pp", "dp", "microbatches")},
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            "why": cfg.layout_why,
        },
    )

    val = TokenData(cfg.data.path, "val") if "val" in data.meta["splits"] and cfg.train.eval_interval else None
    if cfg.train.eval_interval and val is None:
        metrics.message(f"no held-out split in {cfg.data.path} (prepare with --val-fraction): no evaluation")
    batch = partial(
        local_microbatches,
        seq_len=cfg.data.seq_len,
        global_batch=cfg.data.global_batch,
        microbatches=p.microbatches,
        seed=cfg.data.seed,
        dp_rank=groups.dp_rank,
        dp=p.dp,
        sp_rank=groups.sp_rank,
        sp=p.sp,
        layout=p.sp_layout,
        eos_id=data.eos_id if cfg.data.reset_at_documents else None,
    )
    autocast = (
        partial(torch.autocast, device.type, dtype=torch.bfloat16)
        if cfg.train.dtype == "bfloat16"
        else contextlib.nullcontext
    )
    run = _Run(stage, engine, optimizer, groups, batch, autocast, device)
    if val is not None and cfg.train.eval_positions:
        from lasp.parallel.positions import document_rows

        run.position_rows = document_rows(
            val.tokens, val.doc_offsets, cfg.data.seq_len, cfg.train.eval_batches * cfg.data.global_batch
        )
        metrics.message(
            f"train.eval_positions: {len(run.position_rows)} held-out rows of {cfg.data.seq_len} "
            "tokens inside one document" + ("" if len(run.position_rows) else ": none long enough, no position buckets")
        )

    ckpt = Checkpointer(cfg, stage, optimizer, engine, groups, device, data.meta["tokenizer"], metrics.message)
    state = TrainState()
    if resume:
        state = ckpt.load(resume)
        ckpt.started_from = resume
        state.stopped_by = None
        metrics.message(
            f"resuming from {resume}: step {state.step}, {state.tokens:,} tokens seen"
            + "".join(f"\n  {n}" for n in notes)
        )
        if state.step >= cfg.train.steps:
            metrics.message(
                f"the checkpoint is at step {state.step} and train.steps is {cfg.train.steps}: nothing "
                "to train (raise train.steps to go on, or use another logging.run_dir)"
            )
    _loop(cfg, run, state, stop, data, val, metrics, ckpt)
    ckpt.finish()
    metrics.close(cfg.logging.plot)
    return state


def _loop(
    cfg: TrainConfig,
    run: _Run,
    state: TrainState,
    stop: GracefulStop,
    data: TokenData,
    val: TokenData | None,
    metrics: Metrics,
    ckpt: Checkpointer,
) -> None:
    """For each step: batch `step` -> forward/backward/sync -> clip -> update -> metrics -> eval ->
    checkpoint -> stop?"""
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    gpu = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None
    peak = peak_flops(gpu, cfg.train.dtype)
    deadline = None if cfg.train.max_minutes is None else time.monotonic() + 60 * cfg.train.max_minutes
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, cfg.optim, cfg.schedule, cfg.train.steps)
        set_lr(run.optimizer, lr)
        with _timeouts(cfg, f"step {state.step + 1} (forward, backward, gradient sync)"):
            loss, grad_norm = _forward_backward(run, run.batch(data, step=state.step), cfg)
            loss, grad_norm = float(loss), float(grad_norm)  # global values: the same on every rank
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite and run.engine is None:
            run.optimizer.step()
        with _timeouts(cfg, f"the MoE statistics of step {state.step + 1}"):
            moe = moe_step(
                run.stage, cfg.parallel, cfg.model.moe, cfg.model.num_layers, cfg.tokens_per_step, update_bias=finite
            )
        state.skipped_in_a_row = 0 if finite else state.skipped_in_a_row + 1
        state.skipped_steps += not finite
        state.step += 1
        state.tokens += cfg.tokens_per_step
        state.first_loss = loss if state.first_loss is None else state.first_loss
        state.last_loss = loss
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        tokens_per_s = cfg.tokens_per_step / (time.perf_counter() - t0)
        if state.step % cfg.logging.interval == 0 or state.step == cfg.train.steps or not finite:
            metrics.log_step(
                {
                    "step": state.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": state.tokens,
                    "tokens_per_s": tokens_per_s,
                    "mfu": None if peak is None else fpt * tokens_per_s / (peak * dist.get_world_size()),
                    "mem_gib": peak_memory_gib(run.device),
                    "skipped": not finite,
                    **moe_columns(moe),
                }
            )
        if not finite:
            _nonfinite(cfg, state, loss, grad_norm, metrics)
        if val is not None and (state.step % cfg.train.eval_interval == 0 or state.step == cfg.train.steps):
            with _timeouts(cfg, f"the evaluation after step {state.step}"):
                state.last_eval_loss = _evaluate(run, val, cfg)
            metrics.log_eval(state.step, state.last_eval_loss)
            if len(run.position_rows):
                with _timeouts(cfg, f"the position buckets after step {state.step}"):
                    metrics.log_positions(state.step, _positions(run, cfg))
        with _timeouts(cfg, f"the stop check after step {state.step}"):
            stopping = stop.agreed(out_of_time=deadline is not None and time.monotonic() > deadline)
        last = stopping or state.step == cfg.train.steps
        with named_timeouts(
            f"the checkpoint save of step {state.step}", cfg.checkpoint.timeout_s, "checkpoint.timeout_s"
        ):
            if ckpt.due(state.step) or (last and cfg.checkpoint.save_on_exit):
                ckpt.save(state)
            else:
                ckpt.poll()
        if stopping:
            state.stopped_by = stop.signal_name
            metrics.message(f"{stop.signal_name}: stopping cleanly after step {state.step}")
            break


def _timeouts(cfg: TrainConfig, phase: str):
    return named_timeouts(phase, cfg.train.collective_timeout_s, "train.collective_timeout_s")


def _to(device: torch.device, microbatches: list[dict]) -> list[dict]:
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
        for mb in microbatches
    ]


def _forward_backward(run: _Run, microbatches: list[dict], cfg: TrainConfig):
    """Forward, backward, gradient sync and clipping of one step -> (global loss, global gradient norm).
    Without ZeRO the optimizer step is left to the caller (it may skip it); DeepSpeed steps inside."""
    p, mbs = cfg.parallel, _to(run.device, microbatches)
    if run.engine is None:
        with run.autocast():
            loss = forward_backward_step(run.stage, mbs, p, run.groups, cfg.tokens_per_step)
        return loss, clip_grad_norm_(run.stage, run.groups, cfg.optim.grad_clip)
    with run.autocast():
        loss = zero_train_step(run.engine, mbs, loss_sum_fn(p, run.groups, run.stage), run.groups)
    return loss, run.engine.get_global_grad_norm()


def _evaluate(run: _Run, val: TokenData, cfg: TrainConfig) -> float:
    """Mean loss over the first train.eval_batches global batches of the held-out split (in order)."""
    p, losses = cfg.parallel, []
    for i in range(cfg.train.eval_batches):
        mbs = _to(run.device, run.batch(val, step=i, shuffle=False))
        with torch.no_grad(), run.autocast():
            if run.engine is None:
                losses.append(eval_step(run.stage, mbs, p, run.groups, cfg.tokens_per_step))
            else:
                loss_fn = loss_sum_fn(p, run.groups, run.stage)
                losses.append(zero_eval_step(run.engine, mbs, loss_fn, run.groups, cfg.tokens_per_step))
    return float(sum(losses) / len(losses))


def _positions(run: _Run, cfg: TrainConfig) -> list[dict]:
    """The held-out loss per position bucket of the model as it is (tp = pp = 1: the stage is the model,
    its head whole), under SP over the SP group."""
    from lasp.parallel.positions import position_losses

    def logits(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return run.stage.lm_head(run.stage(tokens, positions))

    group = run.groups.sp if cfg.parallel.sp > 1 else None
    with torch.no_grad(), run.autocast():
        return position_losses(logits, run.position_rows, group=group, layout=cfg.parallel.sp_layout, device=run.device)


def _nonfinite(cfg: TrainConfig, state: TrainState, loss: float, norm: float, metrics: Metrics) -> None:
    """Skip (no update) or stop, as configured; every rank sees the same global values and acts alike."""
    what = f"step {state.step}: non-finite loss {loss} or gradient norm {norm}"
    if cfg.train.nonfinite == "stop":
        metrics.close(cfg.logging.plot)
        raise NonFiniteError(f"{what}; stopping (train.nonfinite = stop)")
    if state.skipped_in_a_row > cfg.train.max_skipped_steps:
        metrics.close(cfg.logging.plot)
        raise NonFiniteError(
            f"{what}; {state.skipped_in_a_row} steps skipped in a row "
            f"(train.max_skipped_steps = {cfg.train.max_skipped_steps})"
        )
    metrics.message(f"{what}; update skipped ({state.skipped_steps} so far)")
