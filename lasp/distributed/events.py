"""The operations a torch.profiler run recorded, read straight from its Kineto results.

`prof.events()` builds a FunctionEvent tree over every recorded op: on a small distributed step that is
tens of milliseconds, ten times the step itself, which made counting collectives the main cost of the
exactness tests. The raw Kineto events carry what counting needs (name, input shapes and dtypes, start
and duration) at a fraction of the cost.
"""

from typing import NamedTuple


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
