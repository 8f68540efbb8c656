"""An alpha-beta cost model of the SP methods: what each one sends, and how long a layer takes.

Legend: W ranks, B batch, T local tokens, H query heads, Hkv key/value heads, K key head dim, V value
head dim, n chunks per rank (1 contiguous, 2 zigzag), s the input's bytes per element, s_f32 = 4 (states
and Ring's backward accumulators are float32; float64 inputs keep float64).

Collectives follow nccl-tests' bus-bandwidth conventions (a ring algorithm; `alpha` the latency of one
step, `beta` seconds per byte at the bus bandwidth):
    all-gather / reduce-scatter of S bytes in total:   (W-1) alpha + (W-1)/W S beta
    all-reduce of S bytes:                              2 (W-1) alpha + 2 (W-1)/W S beta
    all-to-all, S bytes per rank:                       (W-1) alpha + (W-1)/W S beta
    point-to-point of S bytes (send and receive at once): alpha + S beta
A point-to-point message is either a hop of a chain (`p2p`: one rank sends, the next waits for it) or
part of a round in which every rank sends and receives at once (`p2p_round`: Ring, logscan); a link may
price them apart (on a CPU shared by more processes than cores a round waits for every process).

A layer's time is its per-rank compute (measured, or simulated: `lasp.bench.sp simulate`) plus the part of
each message the implementation does not hide. Only LASP-2 overlaps: its all-gather is in flight while the
intra-chunk term is computed (forward and backward). LASP-1's hops wait on each other; `allscan`'s chain
is pipelined over blocks of V columns, so its critical path is (hops + blocks - 1) block messages;
`logscan` waits for ceil(log2 C) rounds of pairs; Ring (softmax, and linear in both forms) here shifts a
block, then computes on it; Ulysses and LASP-2H wait for their collectives.

`choose_linear` / `choose_softmax` (the `auto` method of lasp.sp.sp_linear_attn): the method whose
messages cost least for the call's shape on the group's link, which is measured once per process group
(`calibrate`: a few all-gathers and point-to-point rounds, fitted by `fit_link`, the times agreed over the
group so every rank picks alike) or set with `use_link` (a preset name or a `Link`). The compute is the
same for every core method, so it is left out; the pick is logged once per layer kind and shape.
"""

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lasp.sp.chain import ALLSCAN_BLOCKS, column_blocks
from lasp.sp.logscan import rounds

GB = 1e9


@dataclass(frozen=True)
class Link:
    """An interconnect: latency per ring step and bus bandwidth."""

    name: str
    alpha_s: float
    """Seconds per step (a message's fixed cost)."""
    busbw_bytes_per_s: float
    """Bus bandwidth for large messages (nccl-tests' busbw)."""
    overlap: float = 1.0
    """Fraction of the compute in flight that hides communication (1: a separate engine, as NVLink/IB DMA;
    0: the same cores do both, as gloo on a CPU with no spare core)."""
    source: str = ""
    p2p_alpha_s: float | None = None
    """A chain's hops' own latency and bandwidth, where they were measured apart (`calibrate`); None: the
    collectives' figures."""
    p2p_busbw_bytes_per_s: float | None = None
    round_alpha_s: float | None = None
    """The same for a round of point-to-point messages on every rank at once; None: as a hop."""
    round_busbw_bytes_per_s: float | None = None
    flops_per_s: float = float("inf")
    """The rate of the small matrix products the scans of the core methods run (inf: free, the presets)."""

    @property
    def beta(self) -> float:
        return 1.0 / self.busbw_bytes_per_s


PRESETS = {
    # NVIDIA nccl-tests all_gather_perf on 8x H100 SXM (NVLink4, NVSwitch): bus bandwidth reaches about
    # 370 GB/s for large messages (NVLink4 is 450 GB/s per direction per GPU); small-message latency a few
    # microseconds per step.
    "nvlink4-h100": Link(
        "nvlink4-h100", 3e-6, 370 * GB, 1.0, "nccl-tests all_gather_perf busbw on DGX H100, ~370 GB/s; ~3 us per step"
    ),
    # InfiniBand NDR 400 Gb/s = 50 GB/s line rate per NIC; nccl-tests across nodes reach about 46-49 GB/s
    # busbw per NIC; latency tens of microseconds per step across the fabric.
    "ib-ndr400": Link(
        "ib-ndr400",
        20e-6,
        47 * GB,
        1.0,
        "NDR 400G: 50 GB/s line rate, ~46-49 GB/s nccl-tests busbw per NIC; ~20 us per step",
    ),
    # The LASP-2 paper's cluster: A100 80GB with NVSwitch, 600 GB/s NVLink3 (its stated figure; nccl-tests
    # busbw on A100 NVSwitch is lower, about 230 GB/s).
    "a100-nvswitch-600": Link(
        "a100-nvswitch-600", 5e-6, 600 * GB, 1.0, "LASP-2 paper (Sun et al. 2025): A100 80GB, NVSwitch 600 GB/s"
    ),
}


@dataclass(frozen=True)
class Shape:
    """One SP attention layer's sizes as a rank sees them."""

    W: int
    B: int
    T: int
    H: int
    Hkv: int
    K: int
    V: int
    layout: str = "zigzag"
    itemsize: int = 2
    """Bytes per element of q, k, v (2: bf16/fp16, 4: fp32, 8: fp64)."""
    form: str = "none"
    """The linear form: none or decay (a transition known locally), scalar or vector (a gate), deltanet,
    gdn or kda (the delta rule: a K x K transition per chunk)."""

    @property
    def n(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    @property
    def state_itemsize(self) -> int:
        return 8 if self.itemsize == 8 else 4

    @property
    def travels(self) -> bool:
        """Whether a chunk's transition crosses ranks (not when every chunk has the same one: decay, none)."""
        return self.form not in ("none", "decay")

    @property
    def transition_floats(self) -> int:
        """Floats per batch row and head a chunk's transition adds to LASP-2's forward pair."""
        forms = {
            "none": 0,
            "decay": 0,
            "scalar": 1,
            "vector": self.K,
            "deltanet": self.K * self.K,
            "gdn": self.K * self.K,
            "kda": self.K * self.K,
        }
        if self.form not in forms:
            raise ValueError(f"form must be one of {', '.join(forms)}, got {self.form!r}")
        return forms[self.form]


@dataclass(frozen=True)
class Message:
    """One collective (or one hop) a rank makes in a phase."""

    kind: str
    """all_gather, reduce_scatter, all_reduce, all_to_all, p2p (a hop) or p2p_round (every rank at once)."""
    nbytes: int
    """all_gather / reduce_scatter / all_reduce: the total buffer; all_to_all: per rank; p2p: the message."""
    hidden: bool = False
    """In flight while the phase's overlappable compute runs (LASP-2)."""


@dataclass(frozen=True)
class Plan:
    """What a method sends per layer: forward and backward messages, in order."""

    fwd: list[Message] = field(default_factory=list)
    bwd: list[Message] = field(default_factory=list)
    flops: float = 0.0
    """The floating-point work of combining the states on a rank's critical path, per direction: the
    scans' products A S (and logscan's A A), which only the core methods run."""


def collective_time(m: Message, W: int, link: Link) -> float:
    """Seconds for message `m` among W ranks on `link` (see module doc)."""
    if W == 1:
        return 0.0
    a, b, S = link.alpha_s, link.beta, m.nbytes
    if m.kind == "p2p_round" and link.round_alpha_s is not None:
        a, b = link.round_alpha_s, 1.0 / link.round_busbw_bytes_per_s
    elif m.kind in ("p2p", "p2p_round") and link.p2p_alpha_s is not None:
        a, b = link.p2p_alpha_s, 1.0 / link.p2p_busbw_bytes_per_s
    if m.kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (W - 1) * a + (W - 1) / W * S * b
    if m.kind == "all_reduce":
        return 2 * (W - 1) * a + 2 * (W - 1) / W * S * b
    if m.kind in ("p2p", "p2p_round"):
        return a + S * b
    raise ValueError(f"unknown message kind {m.kind!r}")


def plan(method: str, s: Shape, causal: bool = True, link: "Link | None" = None) -> Plan:
    """The messages of one layer of `method` (the names of `lasp.bench.sp.methods.METHODS`): the core
    methods lasp2, lasp1, allscan, logscan; ulysses_linear, ring_linear, ring_linear_quadratic; and the
    softmax methods lasp2h, ulysses, ring."""
    W, n = s.W, s.n
    if W == 1:
        return Plan()
    state = s.B * s.H * s.K * s.V * s.state_itemsize
    pair = state + s.B * s.H * s.transition_floats * s.state_itemsize
    chains = 1 if causal else 2  # the bidirectional form: a prefix and a suffix chain (scan)
    full = s.form in ("deltanet", "gdn", "kda")
    step = s.B * s.H * s.K * s.V * (2 * s.K + 1 if full else 2)  # one A S + M
    compose = s.B * s.H * (2 * s.K**3 if full else s.K) + step  # logscan: (A2 A1, A2 M1 + M2)
    if method == "lasp2":  # forward: each chunk's pair (transition, state); backward: the state gradients
        return Plan(
            [Message("all_gather", W * n * pair, hidden=True)],
            [Message("all_gather", W * n * state, hidden=True)],
            W * n * step * chains,
        )
    if method == "lasp1":  # the chain's hops, in sequence across the group (each rank receives n of them)
        hops = n * (W - 1) * chains
        return Plan([Message("p2p", state)] * hops, [Message("p2p", state)] * hops, (hops + n) * step)
    if method == "allscan":  # the critical path of the pipelined chain: hops + blocks - 1 block messages
        blocks, hops = len(column_blocks(s.V, ALLSCAN_BLOCKS)), n * (W - 1)
        # pipelined where a link moves data beside the compute (overlap 1: DMA engines); where the same cores
        # do both (overlap 0: gloo on a CPU) the blocks of a hop follow each other
        overlap = 1.0 if link is None else link.overlap
        steps = round((overlap * (hops + blocks - 1) + (1 - overlap) * hops * blocks) * chains)
        return Plan(
            [Message("p2p", state // blocks)] * steps,
            [Message("p2p", state // blocks)] * steps,
            (steps + n) * step / blocks,
        )
    if method == "logscan":  # ceil(log2 C) rounds; a rank receives one pair per local chunk in a round
        r = rounds(n * W)
        each = n * (pair if s.travels else state)
        products = max(0, 2 * r - 3)  # round 1 composes the inclusive pair only, the last round neither
        flops = chains * n * (products * compose + step)
        return Plan([Message("p2p_round", each)] * (r * chains), [Message("p2p_round", each)] * (r * chains), flops)
    if method in ("ulysses_linear", "ulysses"):
        hk = s.Hkv if s.Hkv % W == 0 else s.H
        tok = s.B * s.T * s.itemsize
        fwd = [
            Message("all_to_all", tok * s.H * s.K),
            Message("all_to_all", tok * hk * s.K),
            Message("all_to_all", tok * hk * s.V),
            Message("all_to_all", tok * s.H * s.V),
        ]
        gate = {"scalar": 1, "vector": s.K, "gdn": 1, "kda": s.K}.get(s.form, 0)
        fwd += [Message("all_to_all", tok * s.H * gate)] if gate and method == "ulysses_linear" else []
        fwd += [Message("all_to_all", tok * s.H)] if s.form in ("deltanet", "gdn", "kda") else []  # beta
        return Plan(fwd, list(reversed(fwd)))
    if method in ("ring_linear", "ring_linear_quadratic"):  # K/V with H heads (repeated for GQA) go round
        block = s.B * s.T * s.H * (s.K + s.V) * s.itemsize
        return Plan([Message("p2p_round", block)] * (W - 1), [Message("p2p_round", block)] * (W - 1))
    kv = s.B * s.T * s.Hkv * (s.K + s.V)
    if method == "lasp2h":
        return Plan([Message("all_gather", W * kv * s.itemsize)], [Message("reduce_scatter", W * kv * s.itemsize)])
    if method == "ring":
        acc = s.state_itemsize  # the backward's blocks travel in float32 with their dK/dV accumulators
        return Plan(
            [Message("p2p_round", kv * s.itemsize)] * (W - 1),
            [Message("p2p_round", 2 * kv * acc)] * (W - 1) + [Message("p2p_round", kv * acc)],
        )
    raise ValueError(f"no cost plan for method {method!r}")


@dataclass(frozen=True)
class Compute:
    """Per-rank compute of one layer (the slowest rank's), seconds."""

    fwd: float
    bwd: float
    fwd_overlap: float = 0.0
    """Compute during which the forward's hidden messages are in flight (LASP-2: the intra-chunk term)."""
    bwd_overlap: float = 0.0


def _phase(messages: list[Message], compute: float, window: float, W: int, link: Link, flops: float = 0.0) -> float:
    hidden = sum(collective_time(m, W, link) for m in messages if m.hidden)
    exposed = sum(collective_time(m, W, link) for m in messages if not m.hidden)
    scan = flops / link.flops_per_s if W > 1 else 0.0
    return compute + max(0.0, hidden - link.overlap * window) + exposed + scan


def layer_time(method: str, s: Shape, compute: Compute, link: Link, causal: bool = True) -> dict:
    """Predicted seconds of one layer's forward and backward: {fwd, bwd, step, comm_fwd, comm_bwd}."""
    p = plan(method, s, causal, link)
    fwd = _phase(p.fwd, compute.fwd, compute.fwd_overlap, s.W, link, p.flops)
    bwd = _phase(p.bwd, compute.bwd, compute.bwd_overlap, s.W, link, p.flops)
    return {
        "fwd": fwd,
        "bwd": bwd,
        "step": fwd + bwd,
        "comm_fwd": fwd - compute.fwd,
        "comm_bwd": bwd - compute.bwd,
        "bytes_fwd": sum(m.nbytes for m in p.fwd),
        "bytes_bwd": sum(m.nbytes for m in p.bwd),
    }


def fit_link(samples: list[tuple[str, int, int, float]], name: str = "fitted", overlap: float = 0.0) -> Link:
    """Least-squares alpha and beta from measured (kind, W, nbytes, seconds) samples: each sample's time is
    steps(kind, W) * alpha + volume(kind, W, nbytes) * beta, as in `collective_time`."""
    rows, ys = [], []
    for kind, W, nbytes, seconds in samples:
        unit = collective_time(Message(kind, nbytes), W, Link("unit", 1.0, 1.0))  # steps + volume
        steps = collective_time(Message(kind, 0), W, Link("unit", 1.0, 1.0))
        rows.append((steps, unit - steps))
        ys.append(seconds)
    saa = sum(a * a for a, _ in rows)
    sab = sum(a * b for a, b in rows)
    sbb = sum(b * b for _, b in rows)
    say = sum(a * y for (a, _), y in zip(rows, ys))
    sby = sum(b * y for (_, b), y in zip(rows, ys))
    det = saa * sbb - sab * sab
    if len(samples) < 2 or det <= 0:
        raise ValueError(f"fitting alpha and beta needs samples of at least two sizes, got {len(samples)}")
    alpha, beta = (say * sbb - sby * sab) / det, (saa * sby - sab * say) / det
    if alpha < 0:  # latency below the noise: fit the bandwidth alone
        alpha, beta = 0.0, sby / sbb
    if beta <= 0:
        raise ValueError(
            f"the samples give a non-positive bandwidth term ({beta:.3g} s/byte): time does not grow "
            "with size; measure larger messages"
        )
    return Link(name, alpha, 1.0 / beta, overlap, f"fitted to {len(samples)} measured collectives")


# ---- the `auto` method: calibrate the group's link once, then pick per call signature ----

_LINKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_OVERRIDE: list[Link | None] = [None]
_LOGGED: set = set()
CALIBRATION_BYTES = (16 << 10, 256 << 10, 2 << 20)
"""Message sizes `calibrate` times (each with its all-gather and a point-to-point round)."""
log = logging.getLogger("lasp.sp")


def use_link(link: "Link | str | None") -> None:
    """Price `auto`'s choices on this link (a `Link`, or a preset name: nvlink4-h100, ib-ndr400,
    a100-nvswitch-600) instead of measuring each group; None measures again (`calibrate`)."""
    if isinstance(link, str):
        if link not in PRESETS:
            raise ValueError(f"unknown link {link!r}: one of {', '.join(PRESETS)}, or calibrate")
        link = PRESETS[link]
    _OVERRIDE[0] = link


def calibrate(group=None, sizes=CALIBRATION_BYTES, reps: int = 5) -> Link:
    """Measure the group's link: for each size, the median of `reps` all-gathers, relays (rank 0 to W-1, hop
    by hop) and rounds of a point-to-point exchange with the ring neighbours, after a warm-up; and the rate
    of a batch of 128 x 128 products (every rank at once). Every rank takes the group's slowest times (one
    all-reduce), so every rank fits the same link and `auto` picks alike on every rank."""
    from lasp.distributed.comm import exchange, group_rank, group_size, recv, send

    W, rank = group_size(group), group_rank(group)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    kinds = ("all_gather", "p2p", "p2p_round")
    for nbytes in sizes:
        x = torch.zeros(nbytes // 4, device=device)
        out = x.new_empty(W * x.numel())
        for kind in kinds:

            def once():
                if kind == "all_gather":
                    dist.all_gather_into_tensor(out, x, group=group)
                elif kind == "p2p_round":
                    exchange([(x, (rank + 1) % W, 0)], [(torch.empty_like(x), (rank - 1) % W, 0)], group)
                else:  # a relay: W - 1 hops, each waiting for the one before
                    if rank > 0:
                        recv(x, rank - 1, group)
                    if rank < W - 1:
                        send(x, rank + 1, group)

            once()
            took = []
            for _ in range(reps):
                dist.barrier(group=group)
                sync()
                t0 = time.perf_counter()
                once()
                sync()
                took.append(time.perf_counter() - t0)
            times.append(sorted(took)[len(took) // 2] / (W - 1 if kind == "p2p" else 1))  # the median
    a = torch.randn(16, 128, 128, device=device)
    product = lambda: a @ a  # noqa: E731 - the size of a delta-rule transition times a state, per head
    product()
    dist.barrier(group=group)  # every rank at once, as in a layer: a CPU's cores are shared
    sync()
    t0 = time.perf_counter()
    for _ in range(4 * reps):
        product()
    sync()
    times.append((time.perf_counter() - t0) / (4 * reps))
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    *comm, product_s = slowest.tolist()
    samples = [
        (k, W, n * (W if k == "all_gather" else 1), t)
        for (n, k), t in zip([(n, k) for n in sizes for k in kinds], comm)
    ]
    fits = {k: _fit_or_bound([(k if k != "p2p_round" else "p2p", *x[1:]) for x in samples if x[0] == k]) for k in kinds}
    return Link(
        f"calibrated ({backend}, W={W})",
        fits["all_gather"].alpha_s,
        fits["all_gather"].busbw_bytes_per_s,
        overlap=1.0 if device.type == "cuda" else 0.0,
        source=f"measured: all-gathers, relays and rounds of {sizes[0]}-{sizes[-1]} bytes",
        p2p_alpha_s=fits["p2p"].alpha_s,
        p2p_busbw_bytes_per_s=fits["p2p"].busbw_bytes_per_s,
        round_alpha_s=fits["p2p_round"].alpha_s,
        round_busbw_bytes_per_s=fits["p2p_round"].busbw_bytes_per_s,
        flops_per_s=2 * 16 * 128**3 / product_s,
    )


def _fit_or_bound(samples) -> Link:
    """`fit_link`, or where noise made time not grow with size, a bound: the smallest message's time as the
    latency and the largest one's bytes per second as the bandwidth."""
    try:
        return fit_link(samples)
    except ValueError:
        small, large = min(samples, key=lambda x: x[2]), max(samples, key=lambda x: x[2])
        unit = collective_time(Message(small[0], 0), small[1], Link("unit", 1.0, 1.0))
        volume = collective_time(Message(large[0], large[2]), large[1], Link("unit", 0.0, 1.0))
        return Link("bounded", small[3] / unit, volume / large[3])


def link_of(group=None) -> Link:
    """The link `auto` prices on: `use_link`'s, else the group's calibration (measured once, kept)."""
    if _OVERRIDE[0] is not None:
        return _OVERRIDE[0]
    key = group if group is not None else dist.group.WORLD
    if key not in _LINKS:
        _LINKS[key] = calibrate(group)
        link = _LINKS[key]
        log.info(
            f"sp: measured the link of a group of {dist.get_world_size(group)}: alpha "
            f"{link.alpha_s * 1e6:.1f} us, bus bandwidth {link.busbw_bytes_per_s / 1e9:.2f} GB/s"
        )
    return _LINKS[key]


def form_of(log_decay, gate, beta) -> str:
    """The cost model's name of a call's linear form."""
    if beta is not None:
        return "deltanet" if gate is None else ("gdn" if gate.dim() == 3 else "kda")
    if gate is not None:
        return "scalar" if gate.dim() == 3 else "vector"
    return "none" if log_decay is None else "decay"


LINEAR_CANDIDATES = ("lasp2", "allscan", "logscan", "lasp1", "ulysses_linear")
SOFTMAX_CANDIDATES = ("lasp2h", "ulysses", "ring")


def pick(candidates, shape: Shape, link: Link, causal: bool = True) -> tuple[str, dict[str, float]]:
    """The candidate whose messages cost least for `shape` on `link` (ties: the earlier one), and every
    candidate's predicted seconds (forward + backward, communication only: their compute is the same)."""
    cost = {m: layer_time(m, shape, Compute(0.0, 0.0), link, causal)["step"] for m in candidates}
    return min(cost, key=lambda m: (cost[m], candidates.index(m))), cost


def _logged_pick(kind: str, candidates, shape: Shape, link: Link, causal: bool) -> str:
    best, cost = pick(list(candidates), shape, link, causal)
    key = (kind, shape, causal, link)
    if key not in _LOGGED:
        _LOGGED.add(key)
        others = ", ".join(f"{m} {t * 1e6:.0f} us" for m, t in sorted(cost.items(), key=lambda kv: kv[1]))
        log.info(
            f"sp auto: {kind} layers ({shape.form}, W={shape.W}, B={shape.B}, T={shape.T}, H={shape.H}, "
            f"K={shape.K}, V={shape.V}, {shape.layout}) -> {best} on {link.name} ({others})"
        )
    return best


def choose_linear(
    q,
    k,
    v,
    *,
    group=None,
    layout: str = "zigzag",
    log_decay=None,
    gate=None,
    beta=None,
    causal: bool = True,
    initial_state=None,
    output_final_state: bool = False,
) -> str:
    """`auto` for a linear layer: the method of lasp.sp.sp_linear_attn whose messages cost least. Ulysses is
    a candidate where the heads divide and no state is asked for; Ring (a baseline) is not."""
    from lasp.distributed.comm import group_size

    W = group_size(group)
    if W == 1:
        return "lasp2"
    B, T, H, K = q.shape
    shape = Shape(W, B, T, H, k.shape[2], K, v.shape[3], layout, q.element_size(), form_of(log_decay, gate, beta))
    candidates = [
        m
        for m in LINEAR_CANDIDATES
        if m != "ulysses_linear" or (H % W == 0 and initial_state is None and not output_final_state)
    ]
    best = _logged_pick("linear", candidates, shape, link_of(group), causal)
    return "ulysses" if best == "ulysses_linear" else best


def choose_softmax(q, k, v, *, group=None, layout: str = "zigzag", causal: bool = True) -> str:
    """`auto` for a softmax layer: LASP-2H, Ulysses (where the heads divide) or Ring, by their messages."""
    from lasp.distributed.comm import group_size

    W = group_size(group)
    if W == 1:
        return "lasp2h"
    B, T, H, K = q.shape
    shape = Shape(W, B, T, H, k.shape[2], K, v.shape[3], layout, q.element_size())
    candidates = [m for m in SOFTMAX_CANDIDATES if m != "ulysses" or H % W == 0]
    return _logged_pick("softmax", candidates, shape, link_of(group), causal)
