"""The operations a torch.profiler run recorded, read straight from its Kineto results.

`prof.events()` builds a FunctionEvent tree over every recorded op: on a small distributed step that is
tens of milliseconds, ten times the step itself, which made counting collectives the main cost of the
exactness tests. The raw Kineto events carry what counting needs (name, input shapes and dtypes, start
and duration) at a fraction of the cost.
"""

import os
from typing import NamedTuple

import torch

QUIET_KINETO = "6"  # above Kineto's highest log level (USDT, 5)


def cpu_profile(**kw) -> torch.profiler.profile:
    """torch.profiler.profile of the CPU ops (`kw`: record_shapes, profile_memory), without the two log lines
    Kineto prints to stderr for every profiled region (`USDT: ... profiler_start` / `profiler_stop`), which
    would bury a benchmark's own output under hundreds of them: KINETO_LOG_LEVEL is set above its highest
    level unless the environment sets it (Kineto's errors then go unprinted too)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", QUIET_KINETO)
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], **kw)


class Op(NamedTuple):
    name: str
    input_shapes: list
    input_dtypes: list
    start_ns: int
    duration_ns: int


def profiled_ops(prof, *prefixes: str) -> list[Op]:
    """The CPU-side ops of a finished `torch.profiler.profile`, in start order; with `prefixes`, only the
    ops whose names start with one of them (e.g. "c10d::", "gloo:")."""
    out = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if prefixes and not name.startswith(prefixes):
            continue
        out.append(Op(name, e.shapes(), e.dtypes(), e.start_ns(), e.duration_ns()))
    out.sort(key=lambda op: op.start_ns)
    return out
