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

A layer's time is its per-rank compute (measured, or simulated: `lasp.bench.sp simulate`) plus the part of
each message the implementation does not hide. Only LASP-2 overlaps: its all-gather is in flight while the
intra-chunk term is computed (forward and backward). LASP-1's hops wait on each other; Ring (softmax, and
linear in both forms) here shifts a block, then computes on it; Ulysses and LASP-2H wait for their
collectives.
"""

from dataclasses import dataclass, field

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

    @property
    def beta(self) -> float:
        return 1.0 / self.busbw_bytes_per_s


PRESETS = {
    # NVIDIA nccl-tests all_gather_perf on 8x H100 SXM (NVLink4, NVSwitch): bus bandwidth reaches about
    # 370 GB/s for large messages (NVLink4 is 450 GB/s per direction per GPU); small-message latency a few
    # microseconds per step.
    "nvlink4-h100": Link("nvlink4-h100", 3e-6, 370 * GB, 1.0,
                         "nccl-tests all_gather_perf busbw on DGX H100, ~370 GB/s; ~3 us per step"),
    # InfiniBand NDR 400 Gb/s = 50 GB/s line rate per NIC; nccl-tests across nodes reach about 46-49 GB/s
    # busbw per NIC; latency tens of microseconds per step across the fabric.
    "ib-ndr400": Link("ib-ndr400", 20e-6, 47 * GB, 1.0,
                      "NDR 400G: 50 GB/s line rate, ~46-49 GB/s nccl-tests busbw per NIC; ~20 us per step"),
    # The LASP-2 paper's cluster: A100 80GB with NVSwitch, 600 GB/s NVLink3 (its stated figure; nccl-tests
    # busbw on A100 NVSwitch is lower, about 230 GB/s).
    "a100-nvswitch-600": Link("a100-nvswitch-600", 5e-6, 600 * GB, 1.0,
                              "LASP-2 paper (Sun et al. 2025): A100 80GB, NVSwitch 600 GB/s"),
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
    def transition_floats(self) -> int:
        """Floats per batch row and head a chunk's transition adds to LASP-2's forward pair."""
        forms = {"none": 0, "decay": 0, "scalar": 1, "vector": self.K, "deltanet": self.K * self.K,
                 "gdn": self.K * self.K, "kda": self.K * self.K}
        if self.form not in forms:
            raise ValueError(f"form must be one of {', '.join(forms)}, got {self.form!r}")
        return forms[self.form]


@dataclass(frozen=True)
class Message:
    """One collective (or one hop) a rank makes in a phase."""

    kind: str
    """all_gather, reduce_scatter, all_reduce, all_to_all or p2p."""
    nbytes: int
    """all_gather / reduce_scatter / all_reduce: the total buffer; all_to_all: per rank; p2p: the message."""
    hidden: bool = False
    """In flight while the phase's overlappable compute runs (LASP-2)."""


@dataclass(frozen=True)
class Plan:
    """What a method sends per layer: forward and backward messages, in order."""

    fwd: list[Message] = field(default_factory=list)
    bwd: list[Message] = field(default_factory=list)


def collective_time(m: Message, W: int, link: Link) -> float:
    """Seconds for message `m` among W ranks on `link` (see module doc)."""
    if W == 1:
        return 0.0
    a, b, S = link.alpha_s, link.beta, m.nbytes
    if m.kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (W - 1) * a + (W - 1) / W * S * b
    if m.kind == "all_reduce":
        return 2 * (W - 1) * a + 2 * (W - 1) / W * S * b
    if m.kind == "p2p":
        return a + S * b
    raise ValueError(f"unknown message kind {m.kind!r}")


def plan(method: str, s: Shape, causal: bool = True) -> Plan:
    """The messages of one layer of `method` (the names of `lasp.bench.sp.methods.METHODS`)."""
    W, n = s.W, s.n
    if W == 1:
        return Plan()
    state = s.B * s.H * s.K * s.V * s.state_itemsize
    if method == "lasp2":  # forward: each chunk's pair (transition, state); backward: the state gradients
        pair = state + s.B * s.H * s.transition_floats * s.state_itemsize
        return Plan([Message("all_gather", W * n * pair, hidden=True)], [Message("all_gather", W * n * state, hidden=True)])
    if method == "lasp1":  # the chain's hops, in sequence across the group (each rank receives n of them)
        hops = n * (W - 1) * (1 if causal else 2)
        return Plan([Message("p2p", state)] * hops, [Message("p2p", state)] * hops)
    if method in ("ulysses_linear", "ulysses"):
        hk = s.Hkv if s.Hkv % W == 0 else s.H
        tok = s.B * s.T * s.itemsize
        fwd = [Message("all_to_all", tok * s.H * s.K), Message("all_to_all", tok * hk * s.K),
               Message("all_to_all", tok * hk * s.V), Message("all_to_all", tok * s.H * s.V)]
        return Plan(fwd, list(reversed(fwd)))
    if method in ("ring_linear", "ring_linear_quadratic"):  # K/V with H heads (repeated for GQA) go round
        block = s.B * s.T * s.H * (s.K + s.V) * s.itemsize
        return Plan([Message("p2p", block)] * (W - 1), [Message("p2p", block)] * (W - 1))
    kv = s.B * s.T * s.Hkv * (s.K + s.V)
    if method == "lasp2h":
        return Plan([Message("all_gather", W * kv * s.itemsize)], [Message("reduce_scatter", W * kv * s.itemsize)])
    if method == "ring":
        acc = s.state_itemsize  # the backward's blocks travel in float32 with their dK/dV accumulators
        return Plan([Message("p2p", kv * s.itemsize)] * (W - 1),
                    [Message("p2p", 2 * kv * acc)] * (W - 1) + [Message("p2p", kv * acc)])
    raise ValueError(f"no cost plan for method {method!r}")


@dataclass(frozen=True)
class Compute:
    """Per-rank compute of one layer (the slowest rank's), seconds."""

    fwd: float
    bwd: float
    fwd_overlap: float = 0.0
    """Compute during which the forward's hidden messages are in flight (LASP-2: the intra-chunk term)."""
    bwd_overlap: float = 0.0


def _phase(messages: list[Message], compute: float, window: float, W: int, link: Link) -> float:
    hidden = sum(collective_time(m, W, link) for m in messages if m.hidden)
    exposed = sum(collective_time(m, W, link) for m in messages if not m.hidden)
    return compute + max(0.0, hidden - link.overlap * window) + exposed


def layer_time(method: str, s: Shape, compute: Compute, link: Link, causal: bool = True) -> dict:
    """Predicted seconds of one layer's forward and backward: {fwd, bwd, step, comm_fwd, comm_bwd}."""
    p = plan(method, s, causal)
    fwd = _phase(p.fwd, compute.fwd, compute.fwd_overlap, s.W, link)
    bwd = _phase(p.bwd, compute.bwd, compute.bwd_overlap, s.W, link)
    return {"fwd": fwd, "bwd": bwd, "step": fwd + bwd, "comm_fwd": fwd - compute.fwd, "comm_bwd": bwd - compute.bwd,
            "bytes_fwd": sum(m.nbytes for m in p.fwd), "bytes_bwd": sum(m.nbytes for m in p.bwd)}


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
        raise ValueError(f"the samples give a non-positive bandwidth term ({beta:.3g} s/byte): time does not grow "
                         "with size; measure larger messages")
    return Link(name, alpha, 1.0 / beta, overlap, f"fitted to {len(samples)} measured collectives")
