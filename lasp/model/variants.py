"""The one table of linear-attention variants: what each decays by, whether it is a delta rule, what it allows
and what it costs. Every place that branches on `model.linear_variant` reads this table (docs/design.md,
"Linear forms")."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

FEATURE_MAPS = ("identity", "elu1", "relu", "silu", "hedgehog")
NARROW_MAPS = ("identity", "elu1", "relu", "silu")  # hedgehog doubles the key dim: not for a key-dim gate or delta


class Dims(NamedTuple):
    """The sizes a variant's parameter count depends on."""

    hidden: int
    heads: int
    head_dim: int
    rank: int  # model.gate_low_rank
    projected: bool  # model.gate_source == projection (Liger's key gate has no parameters)
    steps: int = 1  # deltaproduct: delta-rule steps per token, a beta each (model.num_householder)
    memories: int = 1  # MoM: memory heads per head, a gate and beta each (lasp.model.mom)


@dataclass(frozen=True)
class Variant:
    decay: Literal["none", "constant", "gate"]
    """none; constant: fixed per-head slopes (lasp.model.layers.log_decay); gate: data-dependent."""
    gate: Literal["none", "scalar", "vector"]
    """The data-dependent gate's shape: one per token and head, or one per token, head and key dim."""
    delta: bool
    """The delta rule (DeltaNetAttention: short convolutions, L2-normalised q and k, beta, an output gate)."""
    form: str
    """Its form under sequence parallelism (lasp.sp.dispatch.LinearForm, the cost model's key)."""
    window: bool
    """A softmax window can be cut out of its decay (model.window)."""
    feature_maps: tuple[str, ...]
    """The feature maps (model.feature_map) it takes."""
    projections: Callable[[Dims], int]
    """Weights of its own projections per layer (gate, beta, output gate): 6 FLOPs per weight and token."""
    extras: Callable[[Dims], int]
    """Its other parameters per layer (A_log, dt_bias): no FLOPs."""


def _none(d: Dims) -> int:
    return 0


def _scalar_gate(d: Dims) -> int:  # hidden -> H (x memories)
    return d.hidden * d.heads * d.memories * d.projected


def _vector_gate(d: Dims) -> int:  # hidden -> rank -> H (x memories) x D
    return d.rank * (d.hidden + d.heads * d.memories * d.head_dim) * d.projected


def _beta_out(d: Dims) -> int:  # beta (hidden -> H x steps x memories) and the output gate (hidden -> H x D)
    return d.hidden * d.heads * (d.steps * d.memories + d.head_dim)


def _a_log_dt_bias(d: Dims) -> int:  # Gated DeltaNet: A_log per head, dt_bias per head (and memory)
    return d.heads + d.heads * d.memories


def _gated_delta(d: Dims) -> int:  # beta, the output gate, and the gate's projection (hidden -> H x memories)
    return _beta_out(d) + d.hidden * d.heads * d.memories


# fmt: off
VARIANTS: dict[str, Variant] = {
    #                         decay       gate      delta  SP form     window feature maps  projections  extras
    "basic":          Variant("none",     "none",   False, "none",     True,  FEATURE_MAPS, _none,       _none),
    "lightning":      Variant("constant", "none",   False, "decay",    True,  FEATURE_MAPS, _none,       _none),
    "retention":      Variant("constant", "none",   False, "decay",    True,  FEATURE_MAPS, _none,       _none),
    "simple_gla":     Variant("gate",     "scalar", False, "scalar",   True,  FEATURE_MAPS, _scalar_gate, _none),
    "gla":            Variant("gate",     "vector", False, "vector",   False, NARROW_MAPS,  _vector_gate, _none),
    "deltanet":       Variant("none",     "none",   True,  "deltanet", False, NARROW_MAPS,  _beta_out,   _none),
    "gated_deltanet": Variant("gate",     "scalar", True,  "gdn",      False, NARROW_MAPS,
                              _gated_delta, _a_log_dt_bias),
    "kda":            Variant("gate",     "vector", True,  "kda",      False, NARROW_MAPS,
                              lambda d: _beta_out(d) + d.rank * (d.hidden + d.heads * d.memories * d.head_dim),
                              lambda d: d.heads + d.heads * d.memories * d.head_dim),
    # Gated DeltaProduct: Gated DeltaNet with model.num_householder steps per token (an interleaved sequence)
    "deltaproduct":   Variant("gate",     "scalar", True,  "gdn",      False, NARROW_MAPS,
                              _gated_delta, _a_log_dt_bias),
}
# fmt: on
LINEAR_VARIANTS = tuple(VARIANTS)
MOM_BASES = ("gla", "gated_deltanet")
"""The variants Mixture-of-Memories (model.mom_num_memories) runs over: each memory gets its own gate."""
