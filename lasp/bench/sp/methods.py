"""The methods the scaling benchmark runs, and one measurement: a layer's forward and backward on this
rank's shard, timed, with its messages counted by the torch profiler.

Legend: W ranks, N global tokens, T = N / W local tokens, B batch, H query heads, Hkv key/value heads,
D head dim (keys and values).
"""

import contextlib
import functools
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import lasp
from lasp.distributed.comm import p2p_log
from lasp.distributed.events import cpu_profile, profiled_ops
from lasp.sp.cost import Message
from lasp.sp.layout import SeqLayout

METHODS = {
    "lasp2": ("linear", lasp.lasp2_linear_attn),
    "lasp1": ("linear", lasp.lasp1_linear_attn),
    "ulysses_linear": ("linear", lasp.ulysses_linear_attn),
    "ring_linear": ("linear", lasp.ring_linear_attn),
    "ring_linear_quadratic": ("linear", functools.partial(lasp.ring_linear_attn, form="quadratic")),
    "lasp2h": ("softmax", lasp.lasp2h_softmax_attn),
    "ring": ("softmax", lasp.ring_softmax_attn),
    "ulysses": ("softmax", lasp.ulysses_softmax_attn),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    method: str
    W: int
    N: int
    B: int = 1
    H: int = 8
    Hkv: int = 2
    D: int = 64
    layout: str = "zigzag"
    dtype: str = "float32"

    @property
    def T(self) -> int:
        return self.N // self.W

    def unsupported(self) -> str | None:
        """Why this method cannot run this case, or None."""
        if self.N % SeqLayout(self.layout, self.W).num_chunks:
            return f"N={self.N} does not split into {SeqLayout(self.layout, self.W).num_chunks} {self.layout} chunks"
        if self.method.startswith("ulysses") and self.H % self.W:
            return f"Ulysses needs heads % W == 0: {self.H} heads, W={self.W}"
        return None


_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "unsigned char": 1, "long int": 8, "int": 4}


def messages(prof, p2p: list[int]) -> list[Message]:
    """The messages a profile recorded, in the cost model's terms: an all-gather or reduce-scatter by its
    whole buffer, an all-to-all by this rank's buffer; hops by each receive (`p2p`: their bytes, from
    lasp.distributed.comm.p2p_log, as the profiler does not record the tensor lists of send and recv)."""
    out = []
    for e in profiled_ops(prof, "c10d::"):

        def nbytes(i: int) -> int:
            n = 1
            for d in e.input_shapes[i]:
                n *= d
            return n * _BYTES[e.input_dtypes[i]]

        if e.name == "c10d::_allgather_base_":
            out.append(Message("all_gather", nbytes(0)))
        elif e.name == "c10d::_reduce_scatter_base_":
            out.append(Message("reduce_scatter", nbytes(1)))
        elif e.name == "c10d::alltoall_base_":
            out.append(Message("all_to_all", nbytes(1)))
    return out + [Message("p2p", n) for n in p2p]


def overlapped_seconds(prof) -> float:
    """CPU time under the "sp.overlapped" label (the core's zero-start compute, while LASP-2's all-gather flies)."""
    return sum(e.duration_ns for e in profiled_ops(prof, "sp.overlapped")) / 1e9


def measure(case: Case, group, rank: int, reps: int, *, check_ranks: bool, barrier=None, count=None) -> dict:
    """Time `reps` forward and backward passes of case.method on this rank's shard (after one warm-up),
    then one more under the profiler to count messages and find the peak memory above the inputs
    (`count`: a context manager yielding a list that collects the messages the profiler cannot see).
    Returns a row (seconds are medians, with the spread as the 25th-75th percentiles)."""
    kind, fn = METHODS[case.method]
    dt = DTYPES[case.dtype]
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    shape = lambda h: (case.B, case.T, h, case.D)  # noqa: E731
    q, k, v = (torch.randn(*shape(h), generator=gen).to(dev, dt).requires_grad_() for h in (case.H, case.Hkv, case.Hkv))
    do = torch.randn(*shape(case.H), generator=gen).to(dev, dt)
    kw = dict(group=group, layout=case.layout, check_ranks=check_ranks)
    if kind == "linear":
        kw["log_decay"] = -torch.linspace(0.01, 0.5, case.H, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    barrier = barrier or (lambda: None)

    def once() -> tuple[float, float]:
        barrier()
        sync()
        t0 = time.perf_counter()
        o = fn(q, k, v, **kw)
        sync()
        t1 = time.perf_counter()
        o.backward(do)
        sync()
        t2 = time.perf_counter()
        q.grad = k.grad = v.grad = None
        return t1 - t0, t2 - t1

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    once()
    times = [once() for _ in range(reps)]
    if dev.type == "cuda":  # above the inputs, as on a CPU below
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    count = count or (lambda: contextlib.nullcontext([]))
    prof = functools.partial(cpu_profile, record_shapes=True, profile_memory=True)
    with prof() as pf, p2p_log() as hops_f, count() as more_f:
        o = fn(q, k, v, **kw)
    with prof() as pb, p2p_log() as hops_b, count() as more_b:
        o.backward(do)
    if dev.type == "cpu":
        peak = peak_allocated(pf, pb) / 2**30
    fwd, bwd = [t[0] for t in times], [t[1] for t in times]
    step = [a + b for a, b in times]
    return {
        **asdict(case),
        "T": case.T,
        "rank": rank,
        "reps": reps,
        "check_ranks": check_ranks,
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "step_s": statistics.median(step),
        "step_iqr_s": _iqr(step),
        "tokens_per_s": case.B * case.N / statistics.median(step),
        "fwd_overlap_s": overlapped_seconds(pf),
        "bwd_overlap_s": overlapped_seconds(pb),
        "fwd_messages": [asdict(m) for m in messages(pf, hops_f) + more_f],
        "bwd_messages": [asdict(m) for m in messages(pb, hops_b) + more_b],
        "peak_mem_gib": peak,
        "compute_shapes": _compute_shapes(pf) + _compute_shapes(pb),
    }


def peak_allocated(*profiles) -> int:
    """Peak bytes allocated above the start of the first profile, over profiles run one after the other
    (profile_memory=True): the running sum of the allocator's memory events, in time order. On a CPU this is
    the peak memory per rank of the step (torch keeps no CPU peak counter); its inputs are not counted."""
    live = peak = 0
    for p in profiles:
        events = [e for e in p.profiler.kineto_results.events() if e.name() == "[memory]"]
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def _iqr(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


_COMPUTE = (
    "aten::mm",
    "aten::bmm",
    "aten::matmul",
    "aten::einsum",
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::baddbmm",
)


def _compute_shapes(prof) -> list:
    """(op, input shapes) of the matrix products a rank ran: the per-rank compute, whatever the messages."""
    return [[e.name, e.input_shapes] for e in profiled_ops(prof) if e.name in _COMPUTE]
