"""LASP: exact sequence-parallel linear attention (LASP-2) and hybrid softmax layers (LASP-2H)."""

from lasp.kernels import linear_attn
from lasp.kernels.softmax_attn import softmax_attn
from lasp.sp import (
    SeqLayout,
    allscan_linear_attn,
    lasp1_linear_attn,
    lasp2_linear_attn,
    lasp2h_softmax_attn,
    logscan_linear_attn,
    ring_linear_attn,
    ring_softmax_attn,
    shard_sequence,
    sp_linear_attn,
    sp_softmax_attn,
    ulysses_linear_attn,
    ulysses_softmax_attn,
    unshard_sequence,
)

__all__ = [
    "SeqLayout",
    "allscan_linear_attn",
    "lasp1_linear_attn",
    "lasp2_linear_attn",
    "lasp2h_softmax_attn",
    "linear_attn",
    "logscan_linear_attn",
    "ring_linear_attn",
    "ring_softmax_attn",
    "shard_sequence",
    "softmax_attn",
    "sp_linear_attn",
    "sp_softmax_attn",
    "ulysses_linear_attn",
    "ulysses_softmax_attn",
    "unshard_sequence",
]

import sys as _sys

if "lm_eval" in _sys.modules:  # lm-eval already imported: its `lasp` model (lasp.eval.harness), loaded on use
    import lm_eval.models  # noqa: F401, E402 - the built-in models first: lm-eval fills only an empty registry
    from lm_eval.api.registry import model_registry as _models  # noqa: E402

    if "lasp" not in _models.keys():
        _models.register("lasp", target="lasp.eval.harness:LaspLM")
