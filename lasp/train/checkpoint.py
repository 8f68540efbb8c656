"""Sharded, reshardable, atomic checkpoints of a run (torch.distributed.checkpoint, DCP).

What a checkpoint holds (one directory, see ckpt_store for the commit protocol):
- `.metadata` + `__<rank>_0.distcp`: DCP files. `model/<name>` is every parameter (and named buffer: the
  MoE expert biases) under its name in the single-device model (`p.full_name`; each expert is its own
  tensor, written by the ranks that hold it), `optim/<name>/{exp_avg,exp_avg_sq,step}` its AdamW state. A TP
  shard is a DTensor placed Shard(dim) over the TP group, so DCP records every tensor's global shape and
  each chunk's offset; replicas (DP, SP, the stages' tied embedding) are written once. Loading asks for
  this rank's chunks under the NEW layout and DCP reads the overlapping pieces: any tp / sp / pp / dp.
- `rng/rank-NNNNN.pt`: python, numpy, torch CPU and CUDA generator states of every rank.
- `train_state.json`: TrainState (step, tokens, losses), the world and parallel layout, the model config
  and the data's tokenizer; `config.yaml`: the resolved config. `COMMITTED`: the manifest, written last.
- With ZeRO (DeepSpeed) the model and optimizer are DeepSpeed's own files under `zero/`, which load only
  on the layout that wrote them: another layout is refused with the two layouts named.

The data position is the step: the loader is a pure function of (seed, step).
"""

import dataclasses
import datetime
import errno
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lasp.parallel import ParallelGroups
from lasp.train import ckpt_store as store
from lasp.train.ckpt_store import CheckpointError
from lasp.train.config import TrainConfig, dump
from lasp.train.state import TrainState

FORMAT_VERSION = 1


FULL_BELOW_BYTES = 16 * 2**20  # a failed save with less than this free under checkpoint.dir: the disk is full


class CheckpointSaveError(RuntimeError):
    """A save that could not be written (a full disk, a write error): the run stops, the checkpoints
    committed before it are kept."""


def _os_errors(e: BaseException) -> list[OSError]:
    """The OSErrors inside `e`: itself, its causes, and the failures DCP collected from every rank."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if isinstance(x, OSError):
            out.append(x)
        if isinstance(x, CheckpointException):
            todo += [f[0] for f in x.failures.values() if isinstance(f, tuple) and f]
        todo += [c for c in (x.__cause__, x.__context__) if c is not None and c is not x]
    return out


def _unique_params(stage: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in stage.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter the AdamW state torch would create at its first step (step 0, zero moments),
    so a checkpoint can be saved before any update and loaded into a new optimizer in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if st:
                continue
            on_device = group.get("fused") or group.get("capturable")
            st["step"] = (
                torch.zeros((), dtype=torch.float32, device=p.device)
                if on_device
                else torch.tensor(0.0, dtype=torch.float32)
            )
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class _Sharding:
    """Wraps this rank's tensors as DTensors over the TP group where they are TP shards."""

    def __init__(self, groups: ParallelGroups, tp: int, device: torch.device):
        self.tp = tp
        self.mesh = DeviceMesh.from_group(groups.tp, device.type) if tp > 1 else None

    def wrap(self, local: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
        dim = getattr(like, "tp_dim", None)
        if self.mesh is None or dim is None:
            return local.detach()
        shape = list(local.shape)
        shape[dim] *= self.tp
        full = torch.Size(shape)
        return DTensor.from_local(
            local.detach(),
            self.mesh,
            [Shard(dim)],
            run_check=False,
            shape=full,
            stride=torch.empty(full, device="meta").stride(),
        )


def state_dict(stage: nn.Module, optimizer: torch.optim.Optimizer, sharding: _Sharding) -> dict:
    """The DCP state dict of this rank: views of the live tensors (a load writes into them in place)."""
    init_optimizer_state(optimizer)
    sd = {}
    for p in _unique_params(stage):
        name = p.full_name
        sd[f"model/{name}"] = sharding.wrap(p, p)
        st = optimizer.state.get(p)
        if not st:  # frozen (train.trainable): no optimizer state
            continue
        sd[f"optim/{name}/exp_avg"] = sharding.wrap(st["exp_avg"], p)
        sd[f"optim/{name}/exp_avg_sq"] = sharding.wrap(st["exp_avg_sq"], p)
        sd[f"optim/{name}/step"] = st["step"]
    for b in nn.Module.buffers(stage):  # no parameter, but state: the MoE layers' expert biases (megatron
        # DDP has a `buffers` attribute of its own)
        if getattr(b, "full_name", None):
            sd[f"model/{b.full_name}"] = b
    return sd


def _rng_states() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _layout(cfg: TrainConfig) -> dict:
    p = dataclasses.asdict(cfg.parallel)
    return {k: p[k] for k in ("tp", "sp", "pp", "dp", "sp_layout", "microbatches", "zero_stage")}


def compatibility(path: str, cfg: TrainConfig, tokenizer: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) of loading checkpoint `path` into a run of `cfg`: problems make the load an error
    (another model shape or vocabulary, a ZeRO checkpoint on another layout); notes are changes a resume
    allows (a new layout, a new learning rate...), reported to the user."""
    try:
        info = store.read_state(path)
        saved_model, saved_layout = info["model"], info["layout"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{os.path.join(path, store.STATE_FILE)} is unreadable or incomplete ({e!r})"], []
    problems, notes = [], []
    model = dataclasses.asdict(cfg.model)
    for k in sorted(set(model) | set(saved_model)):
        if model.get(k) != saved_model.get(k):
            problems.append(f"model.{k}: the checkpoint has {saved_model.get(k)!r}, this run {model.get(k)!r}")
    saved_tok = info.get("tokenizer") or {}
    for k in ("name", "vocab_size", "eos_id", "sha256"):
        if saved_tok.get(k) != tokenizer.get(k):
            problems.append(
                f"tokenizer {k}: the checkpoint was trained on {saved_tok.get(k)!r}, this run's data "
                f"({cfg.data.path}) has {tokenizer.get(k)!r}: a different vocabulary"
            )
    layout = _layout(cfg)
    changed = {k: (saved_layout.get(k), v) for k, v in layout.items() if saved_layout.get(k) != v}
    if changed and (layout["zero_stage"] or saved_layout.get("zero_stage")):
        what = ", ".join(f"parallel.{k} {a} -> {b}" for k, (a, b) in changed.items())
        problems.append(
            f"a ZeRO checkpoint (DeepSpeed's files) loads only on the layout that saved it; changed: {what}"
        )
    elif changed:
        notes.append("resharding to a new layout: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    saved_cfg = info.get("config", {})
    for section in ("data", "optim", "schedule"):
        now = dataclasses.asdict(getattr(cfg, section))
        for k, v in now.items():
            old = saved_cfg.get(section, {}).get(k, v)
            if old != v:
                notes.append(f"{section}.{k} changed: {old!r} -> {v!r}")
    return problems, notes


class Checkpointer:
    """Saves and loads this rank's part of the run. Every rank calls `save` and `load` together."""

    def __init__(
        self,
        cfg: TrainConfig,
        stage: nn.Module,
        optimizer: torch.optim.Optimizer,
        engine,
        groups: ParallelGroups,
        device: torch.device,
        tokenizer: dict,
        say=print,
    ):
        c = cfg.checkpoint
        self.cfg, self.stage, self.optimizer, self.engine = cfg, stage, optimizer, engine
        self.root, self.interval, self.keep_last = checkpoint_root(cfg), c.interval, c.keep_last
        self.asynchronous = device.type == "cuda" if c.async_save is None else c.async_save
        self.rank, self.tokenizer, self.say = dist.get_rank(), tokenizer, say
        self.sharding = None if engine is not None else _Sharding(groups, cfg.parallel.tp, device)
        self._pending = None  # (future, step, state json) of an asynchronous save not yet committed
        self.started_from: str | None = None  # the checkpoint this run resumed from: keep_last never removes it
        # the saves' own collectives: a longer timeout than training's, and a background writer's
        # collectives never share the training group
        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=c.timeout_s))

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    # -- save ----------------------------------------------------------------------------------------------
    def save(self, state: TrainState) -> None:
        """Write checkpoint `state.step` (all ranks). Synchronous: committed on return. Asynchronous: the
        tensors are copied to host memory, written in the background and committed by `poll` / `finish`."""
        self.finish()
        step = state.step
        error = None
        try:
            if self.rank == 0:
                store.prepare(self.root, step)
        except OSError as e:
            error = e
        self._agree(step, error)  # also the barrier: the directory exists before any rank writes
        tmp = store.tmp_dir(self.root, step)
        try:
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            with open(os.path.join(tmp, "rng", f"rank-{self.rank:05d}.pt"), "wb") as f:
                torch.save(_rng_states(), f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            error = e
        self._agree(step, error)  # a rank that cannot write must not leave the others in DCP's collectives
        info = self._info(state)
        try:
            if self.engine is not None:
                self.engine.save_checkpoint(tmp, tag="zero", save_latest=False)
                dist.barrier(group=self._group)
                self._commit(step, info)
                return
            sd = state_dict(self.stage, self.optimizer, self.sharding)
            writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
            if not self.asynchronous:
                dcp.save(sd, storage_writer=writer, process_group=self._group)
                self._commit(step, info)
                return
            self._pending = (dcp.async_save(sd, storage_writer=writer, process_group=self._group), step, info)
        except (OSError, RuntimeError, CheckpointException) as e:
            self._failed(step, e)
        self.say(f"checkpoint step {step}: writing in the background")

    def _agree(self, step: int, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed to write its part; all fail together if one did."""
        seen = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(seen, None if error is None else f"rank {self.rank}: {error}", group=self._group)
        failed = [s for s in seen if s is not None]
        if failed:
            self._failed(step, error if error is not None else RuntimeError("; ".join(failed)))

    def _failed(self, step: int, e: BaseException) -> None:
        """Stop the run with one message: what failed (the disk full, named), and the checkpoint kept."""
        oserrors = _os_errors(e)
        try:  # before the failed save's files are removed: a full disk has (nearly) nothing left
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        # torch.save reports a full disk without its errno ("unexpected pos"): the free space tells
        full = any(x.errno in (errno.ENOSPC, errno.EDQUOT) for x in oserrors) or (
            free is not None and free < FULL_BELOW_BYTES
        )
        tmp = store.tmp_dir(self.root, step)
        if self.rank == 0:  # the unfinished directory is this save's own: free its space
            store.remove_unfinished(tmp)
        found = store.list_checkpoints(self.root)
        kept = f"the last good checkpoint, {found[-1][1]}, is kept" if found else "no earlier checkpoint exists"
        if full:
            left = "" if free is None else f", {free / 2**20:.1f} MiB free"
            what = f"the disk is full (no space left on device under {self.root}{left})"
        elif oserrors:
            x = oserrors[0]
            what = f"a write failed: {x.strerror or x}" + (f" ({x.filename})" if x.filename else "")
        else:
            what = f"the write failed: {store.last_line(e)}"
        raise CheckpointSaveError(
            f"checkpoint step {step} could not be saved: {what}; {kept}. Free space (or set "
            "checkpoint.dir to another filesystem), then start the same command again to "
            "resume from it"
        ) from None

    def poll(self) -> None:
        """Commit a finished background save (cheap; call once per step)."""
        if self._pending is not None and self._pending[0].done():
            self.finish()

    def finish(self) -> None:
        """Wait for a background save and commit it."""
        if self._pending is None:
            return
        future, step, info = self._pending
        self._pending = None
        try:
            future.result()  # the coordinator's result: every rank's files and the metadata are written
            self._commit(step, info)
        except (OSError, RuntimeError, CheckpointException) as e:
            self._failed(step, e)

    def _info(self, state: TrainState) -> str:
        return json.dumps(
            {
                "format": FORMAT_VERSION,
                "state": dataclasses.asdict(state),
                "world_size": dist.get_world_size(),
                "layout": _layout(self.cfg),
                "model": dataclasses.asdict(self.cfg.model),
                "tokenizer": self.tokenizer,
                "config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
                "torch": torch.__version__,
            },
            indent=1,
        )

    def _commit(self, step: int, info: str) -> None:
        if self.rank != 0:
            return
        tmp = store.tmp_dir(self.root, step)
        store.write_file(os.path.join(tmp, store.STATE_FILE), info)
        store.write_file(os.path.join(tmp, store.CONFIG_FILE), dump(self.cfg))
        path = store.commit(self.root, step, self.keep_last, keep=self.started_from)
        self.say(f"checkpoint step {step}: saved {path}")

    # -- load ----------------------------------------------------------------------------------------------
    def load(self, path: str) -> TrainState:
        """Load checkpoint `path` into this rank's model and optimizer (any layout without ZeRO) and return
        its TrainState. Call `compatibility` first: this assumes the model shapes agree."""
        info = store.read_state(path)
        if self.engine is not None:
            self.engine.load_checkpoint(path, tag="zero", load_lr_scheduler_states=False)
        else:
            self._load_dcp(path)
        same_layout = info["world_size"] == dist.get_world_size() and info["layout"] == _layout(self.cfg)
        rng = os.path.join(path, "rng", f"rank-{self.rank:05d}.pt")
        if same_layout and os.path.isfile(rng):
            try:
                _set_rng_states(torch.load(rng, weights_only=False))
            except Exception as e:  # noqa: BLE001 - unpickling damaged bytes raises anything
                raise CheckpointError(
                    f"{rng} is unreadable or not this trainer's RNG state ({type(e).__name__}: "
                    f"{store.last_line(e)}); use an earlier checkpoint"
                ) from None
        return TrainState(**info["state"])

    def _load_dcp(self, path: str) -> None:
        sd = state_dict(self.stage, self.optimizer, self.sharding)
        try:
            reader = dcp.FileSystemReader(path)
            saved = reader.read_metadata().state_dict_metadata
        except Exception as e:  # noqa: BLE001 - any failure to read the metadata is a damaged checkpoint
            raise CheckpointError(f"{os.path.join(path, '.metadata')} is unreadable: {e!r}") from None
        missing = sorted(k for k in sd if k not in saved)
        if missing:
            zero = " (it was saved with ZeRO)" if os.path.isdir(os.path.join(path, "zero")) else ""
            raise CheckpointError(
                f"checkpoint {path}{zero} lacks {len(missing)} tensor(s) this run needs: "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        for k, v in sd.items():
            want, have = tuple(v.shape), tuple(saved[k].size)
            if want != have:
                raise CheckpointError(f"checkpoint {path}: {k} has shape {have}, this run's is {want}")
        try:
            dcp.load(sd, storage_reader=reader)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps file errors in its own types
            raise CheckpointError(
                f"checkpoint {path} could not be read ({store.last_line(e)}): damaged files? With "
                "checkpoint.verify=true (the default) the sha256 check names them"
            ) from None


def checkpoint_root(cfg: TrainConfig) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.logging.run_dir, "checkpoints")
