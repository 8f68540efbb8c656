"""The trainer's configuration: typed sections, loaded strictly from YAML plus `--set` overrides.

    cfg = load_config("configs/cpu-quickstart.yaml", ["optim.lr=1e-3"], world_size=2)

Everything wrong is reported at once, before any process group or model exists: unknown keys, wrong
types, impossible combinations (heads vs tp, sequence vs the SP layout, batch vs dp x microbatches),
and a dataset that is missing or does not fit the model.
"""

import dataclasses
import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import yaml

from lasp.cli import existing, writable
from lasp.model.config import ModelConfig
from lasp.parallel.config import ParallelConfig
from lasp.parallel.fit import fit
from lasp.train import schema


class ConfigError(ValueError):
    """Every problem of a configuration, one per line, each with its YAML path and values."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


@dataclass
class DataConfig:
    """Where the tokens come from and how a step's batch is shaped."""

    path: str = "data/stdlib"
    """Directory written by `python -m lasp.data prepare` (train.bin, meta.json, optionally val.bin)."""
    seq_len: int = 512
    """Tokens per sequence (the whole sequence, split across the SP ranks)."""
    global_batch: int = 8
    """Sequences per optimizer step, over all DP replicas and microbatches."""
    seed: int = 1234
    """Seed of the sample order: step s always reads the same sequences, whatever the layout."""
    reset_at_documents: bool = False
    """Packed documents: every layer resets at each document start (the token after an EOS): linear layers
    drop their state, softmax layers do not attend across documents, and RoPE positions restart at 0."""

    def problems(self) -> list[str]:
        p = [
            f"data.{name} must be >= 1, got {getattr(self, name)}"
            for name in ("seq_len", "global_batch")
            if getattr(self, name) < 1
        ]
        if self.seed < 0:
            p.append(f"data.seed must be >= 0, got {self.seed}")
        return p


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices and embeddings (norm weights are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over every TP / PP / DP shard) to this; 0 disables clipping."""

    def problems(self) -> list[str]:
        # written `not ok` so that a nan is out of range too (the loader refuses it first, by name)
        p = [
            f"optim.{name} must be > 0, got {getattr(self, name)}"
            for name in ("lr", "eps")
            if not getattr(self, name) > 0
        ]
        p += [
            f"optim.{name} must be in [0, 1), got {getattr(self, name)}"
            for name in ("beta1", "beta2")
            if not 0 <= getattr(self, name) < 1
        ]
        if not self.weight_decay >= 0:
            p.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip >= 0:
            p.append(f"optim.grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        return p


@dataclass
class ScheduleConfig:
    """Learning rate over the steps: linear warmup, then cosine decay."""

    warmup_steps: int = 10
    """Steps of linear warmup from 0 to optim.lr."""
    decay_steps: int | None = None
    """Step at which the cosine reaches its floor (default: train.steps)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine as a fraction of optim.lr."""

    def problems(self) -> list[str]:
        p = []
        if self.warmup_steps < 0:
            p.append(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            p.append(
                f"schedule.decay_steps ({self.decay_steps}) must be after schedule.warmup_steps ({self.warmup_steps})"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        return p


@dataclass
class RunConfig:
    """The run: length, numerics, device, evaluation and what happens on trouble."""

    steps: int = 100
    """Optimizer steps to run."""
    seed: int = 0
    """Seed of the model initialisation (the same full model is built on every rank)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: one CUDA GPU per process when there are any (NCCL), else the CPU (gloo)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: bfloat16 runs under autocast with float32 master weights and optimizer states."""
    kernel: Literal["auto", "torch", "triton", "fla"] = "auto"
    """Linear-attention kernel backend (auto: Triton on a GPU, or flash-linear-attention's kernels (fla) for a
    model whose forms Triton lacks; the PyTorch path on CPU)."""
    activation_checkpointing: Literal["none", "full"] | int = "none"
    """Recompute activations in the backward: none, full (every layer), or k (every k-th layer)."""
    eval_interval: int = 50
    """Evaluate the held-out split every this many steps and at the end (0: never)."""
    eval_batches: int = 4
    """Global batches of the held-out split per evaluation."""
    eval_positions: bool = False
    """At each evaluation also log the mean loss per log-spaced position bucket (1-64, 65-128, ...) over
    held-out rows of data.seq_len tokens inside one document (lasp.parallel.positions; up to eval_batches x
    global_batch rows), into metrics.jsonl ("eval_positions") and TensorBoard. Needs parallel.tp = pp = 1
    and zero_stage 0 (the whole vocabulary's logits on each rank); runs under SP."""
    nonfinite: Literal["skip", "stop"] = "stop"
    """A non-finite loss or gradient norm: skip the step (no update) or stop the run with an error."""
    max_skipped_steps: int = 10
    """With nonfinite=skip, stop anyway after this many skipped steps in a row."""
    collective_timeout_s: int = 300
    """Timeout of every training collective, in seconds: a rank that never arrives becomes an error, on
    every rank that waits, naming the timeout, the step and the collective (checkpoint saves have their own,
    longer checkpoint.timeout_s)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in checkpoint.dir (a fresh start when there is
    none); never: always start fresh (an error if checkpoint.dir holds checkpoints); or a checkpoint path."""
    init_from: str = ""
    """Start from these weights instead of a random initialisation (step 0, a fresh optimizer): a Hugging
    Face Llama / Mistral / Qwen2 / Qwen3 directory or a LASP export. The model section must have the same
    shape; layer_pattern and linear_variant may differ (linear layers reuse the softmax layers' q, k, v, o
    and initialise what is new). A checkpoint to resume from wins: the run continues from it."""
    trainable: Literal["all", "new", "lora"] = "all"
    """Which parameters train: all; new (only those train.init_from does not provide: a linearised layer's
    gates, beta, convolutions, output norms, feature maps); or lora (only the LoRA adapters of
    model.lora_rank). The rest is frozen and has no optimizer state."""
    objective: Literal["lm", "attention_transfer"] = "lm"
    """What the loss is: lm (next-token cross-entropy), or attention_transfer (LoLCATs' stage 1: each linear
    layer's output before o_proj is trained to match the softmax attention of the same layer and weights on
    the same inputs, which the forward passes on; the loss is the squared error summed over layers, averaged
    over heads and dims, per token). attention_transfer needs train.init_from, train.trainable = new and
    parallel.pp = 1."""
    distill_weight: float = 0.0
    """With the lm objective: add this times KL(teacher || model) per token to the loss, the teacher being the
    original softmax model of the same weights (every layer the softmax attention of its own q, k, v, no
    window, LoRA adapters off), run in the same step without gradients. 0: no distillation. Needs
    parallel.pp = 1."""
    max_minutes: float | None = None
    """Stop after the step that crosses this many minutes, save a checkpoint and exit with status 75
    (as on SIGTERM): set it a few minutes under the job's time limit. None: no limit."""

    def problems(self) -> list[str]:
        p = []
        if self.steps < 1:
            p.append(f"train.steps must be >= 1, got {self.steps}")
        ac = self.activation_checkpointing
        if isinstance(ac, int) and ac < 1:
            p.append(f"train.activation_checkpointing must be none, full or an interval >= 1, got {ac}")
        if self.eval_interval < 0 or self.eval_batches < 1:
            p.append(
                f"train.eval_interval must be >= 0 and train.eval_batches >= 1, got "
                f"{self.eval_interval}, {self.eval_batches}"
            )
        if self.max_skipped_steps < 0:
            p.append(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.collective_timeout_s < 1:
            p.append(f"train.collective_timeout_s must be >= 1, got {self.collective_timeout_s}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            p.append(f"train.max_minutes must be > 0 (or null for no limit), got {self.max_minutes}")
        if not self.resume:
            p.append("train.resume must be auto, never or the path of a checkpoint, got an empty string")
        if self.trainable == "new" and not self.init_from:
            p.append("train.trainable = new needs train.init_from (the weights that stay frozen)")
        if not self.distill_weight >= 0:
            p.append(f"train.distill_weight must be >= 0 (0: no distillation), got {self.distill_weight}")
        elif self.distill_weight and self.objective != "lm":
            p.append(f"train.distill_weight ({self.distill_weight}) adds to the lm objective, not to {self.objective}")
        if self.objective == "attention_transfer" and self.trainable != "new":
            p.append(
                f"train.objective = attention_transfer trains only the new parameters: set train.trainable "
                f"= new (got {self.trainable!r})"
            )
        return p

    @property
    def checkpoint_every(self) -> int:
        """0: no activation checkpointing, k: every k-th layer."""
        ac = self.activation_checkpointing
        return {"none": 0, "full": 1}.get(ac, ac) if isinstance(ac, str) else ac


@dataclass
class LoggingConfig:
    """What the run leaves behind and shows."""

    run_dir: str = "runs/quickstart"
    """Directory of metrics.jsonl, TensorBoard events, loss.png and the resolved config."""
    interval: int = 1
    """Write a metrics row every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files (run_dir/tensorboard)."""
    progress: bool = True
    """Show a progress bar on rank 0 (else one line per logged step)."""
    plot: bool = True
    """Write run_dir/loss.png (train and eval loss) at the end."""

    def problems(self) -> list[str]:
        return [] if self.interval >= 1 else [f"logging.interval must be >= 1, got {self.interval}"]


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (torch.distributed.checkpoint): when, where, how many."""

    dir: str | None = None
    """Directory of the checkpoints (default: logging.run_dir/checkpoints); on a filesystem every node sees."""
    interval: int = 100
    """Save every this many steps (0: only at the end and on a stop)."""
    keep_last: int = 2
    """Keep the newest this many checkpoints; older ones are removed after a new one is committed (0: all)."""
    save_on_exit: bool = True
    """Save at the last step and when stopped by a signal or train.max_minutes."""
    async_save: bool | None = None
    """Write in the background after a copy to host memory; null: on GPUs yes, on CPU no (synchronous)."""
    timeout_s: int = 1800
    """Timeout of the collectives of a save (its own process group): writing a large checkpoint to shared
    storage may take far longer than train.collective_timeout_s allows a training collective."""
    verify: bool = True
    """Check the sha256 of every file of the checkpoint a run resumes from against its manifest, refusing a
    damaged one by name; the ranks share the reading (about 0.75 s per GB on one CPU core). false: sizes
    only. (lasp.export, lasp.generate and lasp.eval always check.)"""

    def problems(self) -> list[str]:
        p = []
        if self.interval < 0 or self.keep_last < 0:
            p.append(
                f"checkpoint.interval and checkpoint.keep_last must be >= 0, got {self.interval}, {self.keep_last}"
            )
        if self.timeout_s < 1:
            p.append(f"checkpoint.timeout_s must be >= 1, got {self.timeout_s}")
        return p


@dataclass
class TrainConfig:
    """A whole run. YAML sections: model, parallel, data, optim, schedule, train, checkpoint, logging."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    layout_why = ""
    """How `resolve` settled the parallel layout for the world (lasp.parallel.fit): one line the trainer
    prints and records. Not a field: not part of the YAML."""

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch * self.data.seq_len

    def problems(self, world_size: int | None = None, broken: frozenset[str] = frozenset()) -> list[str]:
        """Every section's own problems, then the rules across sections. A rule that reads a section in
        `broken` (one that did not build: its problems are already reported) is skipped. `world_size` None:
        the configured mesh (dry runs)."""
        ok = functools.partial(_built, broken)
        model = self.model if ok("model") else None
        m, par, data, run = self.model, self.parallel, self.data, self.train
        # every section checks itself; parallel's checks need the model, the world and the batch (below)
        p = [q for name in SECTIONS if name != "parallel" and ok(name) for q in getattr(self, name).problems()]
        if ok("parallel", "data"):
            # the layout for this world (lasp.parallel.fit); a data.seq_len or data.global_batch below 1 is
            # reported by both sections: once is enough
            p += [q for q in fit(par, model, world_size, data.seq_len, data.global_batch)[2] if q not in p]
        if ok("model", "train") and run.checkpoint_every > m.num_layers:
            p.append(
                f"train.activation_checkpointing every {run.checkpoint_every} layers, but the model has {m.num_layers}"
            )
        if ok("parallel", "train") and par.zero_stage and run.nonfinite == "skip":
            p.append(
                f"train.nonfinite = skip needs parallel.zero_stage 0 (got {par.zero_stage}): DeepSpeed "
                "applies the update inside its step; use train.nonfinite = stop"
            )
        if ok("model", "train") and run.trainable == "lora" and not m.lora_rank:
            p.append("train.trainable = lora needs adapters: set model.lora_rank (and model.lora_targets)")
        if ok("train") and run.objective == "attention_transfer":
            if model is not None and not any(m.mixer(i) == "L" for i in range(m.num_layers)):
                p.append(
                    f"train.objective = attention_transfer needs linear layers, but model.layer_pattern "
                    f"{m.layer_pattern!r} has none"
                )
            if ok("parallel") and par.pp != 1:
                p.append(
                    f"train.objective = attention_transfer runs with parallel.pp = 1 (every layer's error is "
                    f"summed on one stage), got {par.pp}"
                )
        if ok("train", "parallel") and run.eval_positions:
            why = [
                f"parallel.{k} = {getattr(par, k)}"
                for k, want in (("tp", 1), ("pp", 1), ("zero_stage", 0))
                if getattr(par, k) != want
            ]
            why += [f"train.objective = {run.objective}"] if run.objective != "lm" else []
            why += ["train.eval_interval = 0"] if not run.eval_interval else []
            if why:
                p.append(
                    "train.eval_positions needs tp = pp = 1, zero_stage 0, the lm objective and "
                    f"evaluations; got {', '.join(why)}"
                )
        if ok("train", "parallel") and run.distill_weight and par.pp != 1:
            p.append(f"train.distill_weight runs with parallel.pp = 1 (the teacher runs the whole model), got {par.pp}")
        teacher = run.objective == "attention_transfer" or bool(run.distill_weight) if ok("train") else False
        if teacher and ok("model") and m.kv_copies > 1:
            p.append(
                "a softmax teacher (train.objective = attention_transfer, train.distill_weight) attends with each "
                f"layer's own q, k and v, but this model's layers have {m.kv_copies} keys and values per head and "
                "token (model.linear_variant deltaproduct's num_householder, model.mom_num_memories), which no "
                "softmax layer has"
            )
        return p

    def preflight(self, broken: frozenset[str] = frozenset()) -> list[str]:
        """The probes of the file system, before any process group: the dataset is there and fits the model,
        the run and checkpoint directories can be written, train.init_from holds weights of this model's
        shape and the data's tokenizer, train.resume is a checkpoint. Sections in `broken` are skipped."""
        ok = functools.partial(_built, broken)
        model = self.model if ok("model") else None
        run = self.train if ok("train") else None
        p = []
        if ok("data"):
            p += _data_problems(self.data, model, evaluate=run is not None and run.eval_interval > 0)
        if ok("logging"):
            p += writable("logging.run_dir", self.logging.run_dir, directory=True)
            if ok("checkpoint") and self.checkpoint.dir is not None:
                p += writable("checkpoint.dir", self.checkpoint.dir, directory=True)
        if run is not None and run.init_from and model is not None:
            from lasp.train.artifacts import init_from_problems

            p += init_from_problems(run.init_from, model, self.data.path if ok("data") else None)
        if run is not None and run.resume not in ("auto", "never", ""):
            from lasp.train.ckpt_store import describe

            what = describe(run.resume)
            if what is not None:
                p.append(f"train.resume: {run.resume} {what}")
        return p


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _built(broken: frozenset[str], *names: str) -> bool:
    """None of the sections `names` is among the `broken` ones (those that did not build)."""
    return not broken & set(names)


def _data_problems(data: DataConfig, model: ModelConfig | None, evaluate: bool) -> list[str]:
    path = data.path
    meta = os.path.join(path, "meta.json")
    wrong = existing("data.path", path, directory=True)
    if wrong:
        make = f"; make a dataset with python -m lasp.data prepare --input FILES --output {path}"
        return [wrong[0] + (make if not os.path.exists(path) else "")]
    if not os.path.isfile(meta):
        return [
            f"data.path: {data.path!r} is not a prepared dataset (no {meta}); make one with "
            f"python -m lasp.data prepare --input FILES --output {data.path}"
        ]
    try:
        with open(meta) as f:
            info = json.load(f)
        vocab = info["tokenizer"]["vocab_size"]
        tokens = info["splits"]["train"]["tokens"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"data.path: {meta} is unreadable or incomplete ({e!r})"]
    from lasp.data.dataset import dataset_problems  # the files' sizes and checksums (lasp/data/dataset.py)

    read = ["train"] + (["val"] if evaluate and "val" in info["splits"] else [])
    p = [f"data.path: {q}" for q in dataset_problems(path, read)]
    if model is not None and vocab > model.vocab_size:
        p.append(
            f"model.vocab_size ({model.vocab_size}) is smaller than the data's vocabulary ({vocab}, "
            f"{info['tokenizer'].get('name')})"
        )
    if tokens < data.seq_len + 1:
        p.append(f"data.seq_len ({data.seq_len}) needs at least {data.seq_len + 1} tokens; {data.path} has {tokens}")
    held_out = info["splits"].get("val", {}).get("tokens")
    if evaluate and held_out is not None and held_out < data.seq_len + 1:
        p.append(
            f"train.eval_interval > 0 reads sequences of {data.seq_len + 1} tokens from the held-out split, "
            f"which has {held_out} (prepare with a larger --val-fraction, or train.eval_interval=0)"
        )
    return p


def resolve(data: dict, source: str, world_size: int | None, check_data: bool = True) -> TrainConfig:
    """A TrainConfig from a parsed YAML dict, or ConfigError with every problem: each section built
    (schema), its problems and the rules across sections (`TrainConfig.problems`), then, unless `check_data`
    is False, the probes of the file system (`TrainConfig.preflight`). `world_size` None skips the check
    against the launched world (dry runs picture the configured mesh)."""
    problems: list[str] = []
    for key in data:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), SECTIONS, n=1)
            problems.append(
                f"{key}: unknown section"
                + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(SECTIONS)})")
            )
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    built = {name: schema.build(cls, data.get(name), name, problems) for name, cls in types.items()}
    broken = frozenset(name for name, section in built.items() if section is None)
    cfg = TrainConfig(**{name: section for name, section in built.items() if section is not None})
    problems += cfg.problems(world_size, broken)
    if check_data:
        problems += cfg.preflight(broken)
    if problems:
        raise ConfigError(source, problems)
    cfg.parallel, cfg.layout_why, _ = fit(cfg.parallel, cfg.model, world_size, cfg.data.seq_len, cfg.data.global_batch)
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong, on one line (its own message spans several and repeats the file's name)."""
    if isinstance(e, yaml.reader.ReaderError):
        where = (
            f"character #x{e.character:04x} at character {e.position}"
            if e.encoding == "unicode"
            else f"byte #x{e.character:02x} at byte {e.position} is not {e.encoding}"
        )
        return f"not a text file ({where}: {e.reason})"
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: " + (f"{e.context}: " if e.context else "") + e.problem
    return " ".join(str(e).split())


def load_config(
    path: str, overrides: list[str] = (), world_size: int | None = None, check_data: bool = True
) -> TrainConfig:
    """Read a YAML file, apply `--set` overrides, and resolve (see `resolve`)."""
    missing = existing("config file", path)
    if missing:
        raise ConfigError(path, missing)
    try:
        with open(os.path.expanduser(path), "rb") as f:  # bytes: PyYAML decodes them and names a bad byte
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(path, [f"cannot read YAML: {e.strerror or e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, [f"cannot read YAML: {_yaml_problem(e)}"]) from None
    except RecursionError:
        raise ConfigError(path, ["cannot read YAML: nested too deeply"]) from None
    if not isinstance(data, dict):
        raise ConfigError(path, [f"the top level must be a mapping of sections, got {type(data).__name__}"])
    problems: list[str] = []
    schema.apply_overrides(data, list(overrides), problems)
    try:
        cfg = resolve(data, path, world_size, check_data)
    except ConfigError as e:  # with the overrides' own problems: every problem at once
        raise ConfigError(path, problems + e.problems) from None
    if problems:
        raise ConfigError(path, problems)
    return cfg


def dump(cfg: TrainConfig) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
