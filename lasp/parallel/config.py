"""How a run is parallelised: a typed dataclass, checked against the model and the world before any work."""

from dataclasses import dataclass, field

from lasp.model.config import ModelConfig, type_problems
from lasp.sp.api import LINEAR_METHODS, SOFTMAX_METHODS
from lasp.sp.cost import PRESETS
from lasp.sp.layout import LAYOUTS


@dataclass
class SpMethodConfig:
    """How each kind of layer combines its work across the SP group (lasp.sp.sp_linear_attn, docs/
    communication.md). `auto`: the cost model's pick for the layer's shape on the group's link."""

    linear: str = "lasp2"
    """lasp2, lasp1, allscan, logscan, ulysses, ring or auto."""
    softmax: str = "lasp2h"
    """lasp2h, ulysses, ring or auto."""

    def __post_init__(self):
        problems = [
            f"parallel.sp_method.{kind} must be one of {', '.join(allowed)}, got {value!r}"
            for kind, value, allowed in (
                ("linear", self.linear, LINEAR_METHODS),
                ("softmax", self.softmax, SOFTMAX_METHODS),
            )
            if value not in allowed
        ]
        if problems:
            raise ValueError("invalid parallel.sp_method:\n  " + "\n  ".join(problems))


@dataclass
class ParallelConfig:
    """Sizes of the TP x SP x PP x DP mesh (rank order, fastest first: tp, sp, dp, pp)."""

    tp: int = 1
    """Tensor-parallel ranks: attention heads, KV heads, MLP width and vocabulary are split across them."""
    sp: int | list[int] = 1
    """Sequence-parallel ranks (megatron-core's context-parallel group): LASP-2 / LASP-2H. A list, e.g.
    [4, 2]: the allowed degrees, the largest that fits the world is taken (lasp.parallel.fit)."""
    pp: int = 1
    """Pipeline stages: the layers are split into this many equal stages."""
    dp: int | str = 1
    """Data-parallel replicas: the global batch is split across them. `auto`: world / (tp x sp x pp), for a
    world whose size may change between restarts (lasp.parallel.fit)."""
    ep: int = 1
    """Expert-parallel ranks (model.moe): each MoE layer's experts are split over ep ranks carved from the
    DP x SP ranks, which send each token to its experts' rank with an all-to-all. Adds no ranks."""
    etp: int = 1
    """Expert tensor parallelism: 1 (every expert whole on its rank) or tp (each expert's width split over
    the TP group, like the dense MLP)."""
    sp_layout: str = "zigzag"
    """Token split of the SP group, the same for every layer: contiguous or zigzag."""
    sp_method: SpMethodConfig = field(default_factory=SpMethodConfig)
    """The SP method of the linear and of the softmax layers, e.g. {linear: auto, softmax: auto}."""
    sp_link: str = "calibrate"
    """What `auto` prices messages on: calibrate (measured once per SP group at the first layer) or a preset
    (nvlink4-h100, ib-ndr400, a100-nvswitch-600)."""
    microbatches: int = 1
    """Microbatches per step (the pipeline schedule runs 1F1B over them when pp > 1)."""
    micro_batch_size: int | None = None
    """Rows per rank per microbatch. Given, the microbatches are data.global_batch / (dp x this), so a world
    that shrank accumulates more of them rather than putting more rows on each rank; null: parallel.microbatches."""
    zero_stage: int = 0
    """0: gradients all-reduced over the DP x SP ranks (plain data parallelism); 1-3: DeepSpeed ZeRO."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the LM head and cross-entropy; 0 computes the whole local sequence at once."""
    dp_bucket_size: int | None = None
    """Gradient elements per all-reduce bucket (zero_stage 0): a bucket is reduced during the backward as
    soon as its gradients are ready. None: megatron-core's default, max(4e7, 1e6 x DP)."""

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.pp * self.dp

    def problems(self, model: ModelConfig | None, world_size: int, seq_len: int, global_batch: int) -> list[str]:
        """Everything wrong with running `model` this way on `world_size` ranks, each with its numbers. A size
        that is wrong is reported once; the checks that divide by it are skipped, the others still run (and
        those against the model, when `model` is None: a model config with problems of its own)."""
        bad = type_problems(self, "parallel")
        for name in ("sp", "dp"):  # a list or auto is the world's to settle, before these checks
            if name not in bad and not isinstance(getattr(self, name), int):
                bad[name] = f"parallel.{name}: {getattr(self, name)!r} is settled for a world size by lasp.parallel.fit"
        p = list(bad.values())
        for name in ("tp", "sp", "pp", "dp", "microbatches"):
            if name not in bad and getattr(self, name) < 1:
                p.append(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        ok = {n for n in ("tp", "sp", "pp", "dp", "microbatches") if n not in bad and getattr(self, n) >= 1}
        for name, value in (("seq_len", seq_len), ("global_batch", global_batch)):
            if value < 1:
                p.append(f"data.{name} must be >= 1, got {value}")
        if {"tp", "sp", "pp", "dp"} <= ok and self.world_size != world_size:
            p.append(
                f"world size {world_size} != tp x sp x pp x dp = {self.tp} x {self.sp} x {self.pp} x {self.dp} "
                f"= {self.world_size}"
            )
        if model is not None and "tp" in ok:
            for name in ("num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size"):
                if getattr(model, name) % self.tp:
                    p.append(f"model.{name} ({getattr(model, name)}) is not divisible by parallel.tp ({self.tp})")
        if model is not None and "pp" in ok and model.num_layers % self.pp:
            p.append(f"model.num_layers ({model.num_layers}) is not divisible by parallel.pp ({self.pp}) stages")
        p += self._moe_problems(model, bad, ok, seq_len, global_batch)
        if "sp_link" not in bad and self.sp_link != "calibrate" and self.sp_link not in PRESETS:
            p.append(f"parallel.sp_link must be calibrate or one of {', '.join(PRESETS)}, got {self.sp_link!r}")
        if (
            model is not None
            and "sp" in ok
            and self.sp > 1
            and "ulysses" in (self.sp_method.linear, self.sp_method.softmax)
            and model.num_heads % (self.sp * (self.tp if "tp" in ok else 1))
        ):
            p.append(
                f"parallel.sp_method ulysses splits the heads over the SP ranks: model.num_heads "
                f"({model.num_heads}) / tp ({self.tp}) is not divisible by parallel.sp ({self.sp})"
            )
        layout_ok = "sp_layout" not in bad and self.sp_layout in LAYOUTS
        if "sp_layout" not in bad and not layout_ok:
            p.append(f"parallel.sp_layout must be one of {', '.join(LAYOUTS)}, got {self.sp_layout!r}")
        if layout_ok and "sp" in ok and seq_len >= 1:
            chunks = self.sp * (2 if self.sp_layout == "zigzag" else 1)
            if seq_len % chunks:
                p.append(
                    f"data.seq_len: sequence length {seq_len} is not divisible by the {self.sp_layout} layout over "
                    f"parallel.sp = {self.sp} ranks (needs a multiple of {chunks})"
                )
        if {"dp", "microbatches"} <= ok and global_batch >= 1 and global_batch % (self.dp * self.microbatches):
            p.append(
                f"data.global_batch: global batch {global_batch} is not divisible by parallel.dp x "
                f"parallel.microbatches = {self.dp} x {self.microbatches}"
            )
        if "dp_bucket_size" not in bad and self.dp_bucket_size is not None and self.dp_bucket_size < 1:
            p.append(f"parallel.dp_bucket_size must be >= 1 or null, got {self.dp_bucket_size}")
        if "loss_chunk_tokens" not in bad and self.loss_chunk_tokens < 0:
            p.append(f"parallel.loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        stage_ok = "zero_stage" not in bad and self.zero_stage in (0, 1, 2, 3)
        if "zero_stage" not in bad and not stage_ok:
            p.append(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if stage_ok and self.zero_stage and "pp" in ok and self.pp > 1:
            p.append(f"parallel.zero_stage {self.zero_stage} needs parallel.pp = 1, got {self.pp}")
        if (
            stage_ok
            and self.zero_stage
            and "tp" in ok
            and self.tp > 1
            and model is not None
            and model.output_norm
            and "L" in model.layer_pattern
        ):
            # each TP rank's per-head output norm gets a partial gradient; only the DDP path sums it over TP
            p.append(
                f"parallel.zero_stage {self.zero_stage} with parallel.tp = {self.tp} needs model.output_norm = "
                "false (ZeRO would not sum the per-head output norm's gradient over the TP ranks)"
            )
        return p

    def _moe_problems(
        self, model: ModelConfig | None, bad: dict, ok: set, seq_len: int, global_batch: int
    ) -> list[str]:
        p = []
        for name in ("ep", "etp"):
            if name not in bad and getattr(self, name) < 1:
                p.append(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        ep_ok = "ep" not in bad and self.ep >= 1
        moe = getattr(model, "moe", None)
        if ep_ok and self.ep > 1 and model is not None and moe is None:
            p.append(f"parallel.ep = {self.ep} needs mixture-of-experts layers (model.moe)")
        if ep_ok and {"dp", "sp"} <= ok and (self.dp * self.sp) % self.ep:
            p.append(
                f"parallel.ep ({self.ep}) must divide parallel.dp x parallel.sp = {self.dp} x {self.sp} "
                f"= {self.dp * self.sp} (experts are split over the DP x SP ranks)"
            )
        if "etp" not in bad and "tp" in ok and self.etp not in (1, self.tp):
            p.append(f"parallel.etp must be 1 or parallel.tp ({self.tp}), got {self.etp}")
        if moe is None:
            return p
        if ep_ok and moe.num_experts % self.ep:
            p.append(f"model.moe.num_experts ({moe.num_experts}) is not divisible by parallel.ep ({self.ep})")
        if "tp" in ok and self.tp > 1:
            if self.etp == self.tp and moe.ffn_hidden_size % self.tp:
                p.append(
                    f"model.moe.ffn_hidden_size ({moe.ffn_hidden_size}) is not divisible by parallel.etp ({self.etp})"
                )
            if moe.shared_ffn_hidden_size % self.tp:
                p.append(
                    f"model.moe.shared_ffn_hidden_size ({moe.shared_ffn_hidden_size}) is not divisible by "
                    f"parallel.tp ({self.tp})"
                )
            if {"sp", "dp", "microbatches"} <= ok and seq_len >= 1 and global_batch >= 1:
                rows = (
                    global_batch // (self.dp * self.microbatches)
                    if global_batch % (self.dp * self.microbatches) == 0
                    else 0
                )
                tokens = rows * (seq_len // self.sp)
                if rows and seq_len % self.sp == 0 and tokens % self.tp:
                    p.append(
                        f"model.moe with parallel.tp = {self.tp}: the tokens of a microbatch on one rank "
                        f"({rows} rows x {seq_len // self.sp}) must split evenly over the TP ranks, which "
                        "route them apart"
                    )
        if "zero_stage" not in bad and self.zero_stage:
            p.append(
                f"model.moe needs parallel.zero_stage 0, got {self.zero_stage} (ZeRO would not reduce the "
                "experts' gradients over their own groups)"
            )
        return p

    def check(self, model: ModelConfig, world_size: int, seq_len: int, global_batch: int) -> None:
        problems = self.problems(model, world_size, seq_len, global_batch)
        if problems:
            raise ValueError("invalid parallel layout:\n  " + "\n  ".join(problems))
