"""Every way of combining the chunks' maps (lasp2, lasp1, allscan, logscan) x every linear form x both
layouts on W gloo processes reproduces one process's `linear_attn` in float64: the output, the final state
and the gradients of q, k, v (GQA), the gate, beta and the initial state, with documents crossing ranks.
Then the profiler counts each method's messages (lasp.sp.core, docs/communication.md)."""

import math
import os

import pytest
import torch
import torch.distributed as dist

from lasp import SeqLayout, linear_attn, shard_sequence, sp_linear_attn
from lasp.bench.sp.methods import peak_allocated
from lasp.distributed.comm import p2p_log
from lasp.sp.chain import ALLSCAN_BLOCKS, column_blocks
from lasp.sp.logscan import rounds
from tests.dist import assert_close_rel, comm_events

GATE = {"scalar": "scalar", "vector": "vector", "deltanet": None, "gdn": "scalar", "kda": "vector", "product": "scalar"}
FORMS = ["none", "decay", "bidirectional", "scalar", "vector", "deltanet", "gdn", "kda", "product"]
DOCS = ["kda"]  # this form runs a second time with documents that cross ranks
METHODS = ["lasp2", "lasp1", "allscan", "logscan"]
B, H, HKV, K, V = 2, 4, 2, 6, 5


def _inputs(form: str, N: int, seed: int = 7, K: int = K, V: int = V):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, do = r(B, N, H, K), r(B, N, HKV, K), r(B, N, HKV, V), r(B, N, H, V)
    s0, dfin = r(B, H, K, V), r(B, H, K, V)
    args = {"causal": form != "bidirectional"}
    if form == "decay":
        args["log_decay"] = -torch.linspace(0.02, 0.9, H, dtype=torch.float64)
    if form in ("deltanet", "gdn", "kda", "product"):
        n = 1
        if form == "product":  # Gated DeltaProduct: three delta-rule steps per token
            n = args["householder"] = 3
            k, v = r(B, N * n, HKV, K), r(B, N * n, HKV, V)
        k = torch.nn.functional.normalize(k, dim=-1)
        args["beta"] = torch.rand(B, N * n, H, generator=gen, dtype=torch.float64) * 1.9 + 0.05
    if GATE.get(form):
        shape = (B, N, H) if GATE[form] == "scalar" else (B, N, H, K)
        args["gate"] = -torch.rand(shape, generator=gen, dtype=torch.float64) * 0.5
    return q, k, v, do, s0, dfin, args


_REFERENCES: dict = {}


def _reference(form: str, with_docs: bool, N: int, cu, kernel):
    """One process's output, final state and gradients (kept: the methods of a W and layout share them)."""
    key = (form, with_docs, N)
    if key not in _REFERENCES:
        q, k, v, do, s0, dfin, args = _inputs(form, N)
        full = {"q": q, "k": k, "v": v, "s0": s0, **{a: args[a] for a in ("gate", "beta") if a in args}}
        ref = {n: x.clone().requires_grad_() for n, x in full.items()}
        other = {a: x for a, x in args.items() if a not in ("gate", "beta")}
        o, final = linear_attn(
            ref["q"],
            ref["k"],
            ref["v"],
            gate=ref.get("gate"),
            beta=ref.get("beta"),
            initial_state=ref["s0"],
            output_final_state=True,
            kernel=kernel,
            cu_seqlens=cu,
            **other,
        )
        torch.autograd.backward([o, final], [do, dfin])
        _REFERENCES[key] = o.detach(), final.detach(), ref
    return _REFERENCES[key]


def case_every_form(method: str, layout: str, chunk_len: int, forms=tuple(FORMS), docs=tuple(DOCS)):
    from lasp.kernels import TorchChunkKernel

    rank, W = dist.get_rank(), dist.get_world_size()
    lay = SeqLayout(layout, W)
    N = chunk_len * lay.num_chunks
    kernel = TorchChunkKernel(block=4, segment_blocks=2)
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    share = (rank + 1) / (W * (W + 1) / 2)  # each rank's share of the final state's gradient
    out = {}
    for form, with_docs in [(f, False) for f in forms] + [(f, True) for f in docs]:
        q, k, v, do, s0, dfin, args = _inputs(form, N)
        cu = [[0, 3, chunk_len + 2, N - 1, N], [0, N - chunk_len - 1, N]] if with_docs else None
        full = {"q": q, "k": k, "v": v, "s0": s0, **{a: args[a] for a in ("gate", "beta") if a in args}}
        other = {a: x for a, x in args.items() if a not in ("gate", "beta")}
        o_ref, f_ref, ref = _reference(form, with_docs, N, cu, kernel)
        mine = {n: (x if n == "s0" else shard(x)).clone().requires_grad_() for n, x in full.items()}
        act = [torch.profiler.ProfilerActivity.CPU]  # the algorithms' own messages: no rank checks (their tests:
        with p2p_log() as got_fwd, torch.profiler.profile(activities=act) as pf:  # test_rank_agreement.py)
            o, final = sp_linear_attn(
                mine["q"],
                mine["k"],
                mine["v"],
                method=method,
                layout=layout,
                gate=mine.get("gate"),
                beta=mine.get("beta"),
                initial_state=mine["s0"],
                output_final_state=True,
                kernel=kernel,
                cu_seqlens=cu,
                check_ranks=False,
                **other,
            )
        with p2p_log() as got_bwd, torch.profiler.profile(activities=act) as pb:
            torch.autograd.backward([o, final], [shard(do), dfin * share])
        what = f"{method} {layout} {form}{' docs' if with_docs else ''}"
        assert_close_rel(o, shard(o_ref), 1e-10, f"{what}: o")
        assert_close_rel(final, f_ref, 1e-10, f"{what}: final state")
        ds0 = mine["s0"].grad.clone()
        dist.all_reduce(ds0)  # partial per rank
        for n, x in mine.items():
            want = ref[n].grad if n == "s0" else shard(ref[n].grad)
            assert_close_rel(ds0 if n == "s0" else x.grad, want, 1e-9, f"{what}: d{n}")
        out[(form, with_docs)] = {
            "fwd": comm_events(pf),
            "bwd": comm_events(pb),
            "p2p_fwd": list(got_fwd),
            "p2p_bwd": list(got_bwd),
        }
    return out


def _expect(method: str, layout: str, W: int, form: str, rank: int, results) -> None:
    """The messages of one form on one rank, besides the states' broadcast (forward) and all-reduce (back)."""
    lay = SeqLayout(layout, W)
    n, C = lay.chunks_per_rank, lay.num_chunks
    state = B * H * K * V * 8
    for phase in ("fwd", "bwd"):
        events = [e for e, _ in results[phase]]
        extra = "gloo:broadcast" if phase == "fwd" else "gloo:all_reduce"
        if form != "bidirectional" or phase == "bwd":  # the bidirectional final state is every chunk's S_in
            assert events.count(extra) == 1, (phase, events)
            events.remove(extra)
        received = results[f"p2p_{phase}"]
        if method == "lasp2":
            assert events == ["gloo:all_gather"], (phase, events)
            assert received == []
            continue
        assert set(events) <= {"gloo:send", "gloo:recv"}, (phase, events)
        chains = 2 if form == "bidirectional" else 1
        if method in ("lasp1", "allscan"):
            hops_in = sum(
                1
                for c in lay.chunks_of(rank)
                for prev in (c - 1, c + 1)
                if 0 <= prev < C
                and lay.owner(prev) != rank
                and (chains == 2 or prev == (c - 1 if phase == "fwd" else c + 1))
            )
            pieces = len(column_blocks(V, ALLSCAN_BLOCKS if method == "allscan" else 1))
            assert len(received) == hops_in * pieces, (phase, received)
            # the whole state crosses each hop once, whatever W: K x V per chunk and direction
            assert sum(received) == hops_in * state, (phase, received)
        else:  # logscan: at most one message per local chunk and round; only the pairs, never W of them
            assert len(received) <= n * rounds(C) * chains, (phase, received)
            assert all(b <= state + B * H * K * K * 8 for b in received), (phase, received)


# W = 3 (odd) on zigzag: 6 chunks, the chain out and back; contiguous at W = 2 and 4
@pytest.mark.parametrize(
    "W, layout", [(2, "contiguous"), (2, "zigzag"), (3, "zigzag"), (4, "contiguous"), (4, "zigzag")]
)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_form_matches_one_process(dist_pool, method, W, layout):
    results = dist_pool(W).run(
        "tests.test_sp_methods:case_every_form", method=method, layout=layout, chunk_len=5 if W % 2 else 4
    )
    for rank, per_form in enumerate(results):
        for (form, _), r in per_form.items():
            _expect(method, layout, W, form, rank, r)
    if method == "logscan":  # the last chunk's owner hears from someone in every round of the forward scan
        lay = SeqLayout(layout, W)
        last = lay.owner(lay.num_chunks - 1)
        assert len(results[last][("none", False)]["p2p_fwd"]) >= rounds(lay.num_chunks) - (layout == "zigzag")


def case_counts(method: str, W_expected: int, K: int, V: int, layout: str = "contiguous"):
    """The messages of one Gated DeltaNet call at this W (no states), 4 tokens per rank, and its peak memory."""
    rank, W = dist.get_rank(), dist.get_world_size()
    assert W == W_expected
    q, k, v, do, _, _, args = _inputs("gdn", 4 * W, K=K, V=V)
    local = [shard_sequence(x, rank=rank, world_size=W, layout=layout).requires_grad_() for x in (q, k, v)]
    extra = {
        a: shard_sequence(x, rank=rank, world_size=W, layout=layout) for a, x in args.items() if a in ("gate", "beta")
    }
    sp_linear_attn(*local, method=method, layout=layout, check_ranks=False, **extra)  # warm
    prof = lambda: torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],  # noqa: E731
        profile_memory=True,
    )
    with p2p_log() as fwd, prof() as pf:
        o = sp_linear_attn(*local, method=method, layout=layout, check_ranks=False, **extra)
    with p2p_log() as bwd, prof() as pb:
        o.backward(shard_sequence(do, rank=rank, world_size=W, layout=layout))
    return {"fwd": list(fwd), "bwd": list(bwd), "peak": peak_allocated(pf, pb)}


def test_point_to_point_bytes_per_rank_do_not_grow_with_W(dist_pool):
    """allscan and lasp1: each rank receives one K x V state per direction whatever W; logscan: ceil(log2 W)
    rounds of pairs (Gated DeltaNet: K x K + K x V), so its bytes grow with log W, never with W; its peak
    memory stays within a constant of lasp1's, where lasp2's grows with W (the same tokens per rank; K = V =
    32, so that a pair, 128 KiB in float64, stands out of the rest of the step's memory)."""
    k, v = 32, 32
    pair, state = B * H * (k * k + k * v) * 8, B * H * k * v * 8
    for W in (2, 4):
        for method in ("lasp1", "allscan", "logscan"):
            res = dist_pool(W).run("tests.test_sp_methods:case_counts", method=method, W_expected=W, K=k, V=v)
            for rank, r in enumerate(res):
                for phase in ("fwd", "bwd"):
                    got = sum(r[phase])
                    if method == "logscan":
                        assert got <= rounds(W) * pair, (method, rank, phase, r[phase])
                        assert len(r[phase]) <= rounds(W)
                    else:
                        first = rank == 0 if phase == "fwd" else rank == W - 1
                        assert got == (0 if first else state), (method, rank, phase, r[phase])
            if method == "logscan":
                assert max(len(r["fwd"]) for r in res) == math.ceil(math.log2(W))
    for W in (3, 4):
        _check_peaks(dist_pool, W, pair, lasp2_above=3.5)


def _check_peaks(dist_pool, W: int, pair: int, lasp2_above: float) -> None:
    """Peak memory per rank (the busiest): logscan's stays within 2.5 pairs of lasp1's, whose memory does
    not depend on W (it holds one incoming state per chunk), where lasp2's gathered pairs grow with W."""
    peaks = {
        m: max(
            r["peak"] for r in dist_pool(W).run("tests.test_sp_methods:case_counts", method=m, W_expected=W, K=32, V=32)
        )
        for m in ("lasp1", "logscan", "lasp2")
    }
    assert peaks["logscan"] <= peaks["lasp1"] + 2.5 * pair, (W, peaks, pair)
    assert peaks["lasp2"] >= peaks["lasp1"] + lasp2_above * pair, (W, peaks, pair)


def case_all_methods(layout: str, chunk_len: int, forms: tuple, docs: tuple):
    return {m: case_every_form(m, layout, chunk_len, forms=forms, docs=docs) for m in METHODS}


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LASP_TEST_W8") != "1",
    reason="W = 8 starts a pool of its own (about 16 s of the suite's 8-minute budget): run it with LASP_TEST_W8=1",
)
def test_every_method_at_eight_ranks(dist_pool):
    """W = 8, zigzag (16 chunks: the log scan's four rounds, a chain of 14 hops): Gated DeltaNet with states
    and documents crossing ranks; and the peak memory bound of logscan at W = 8."""
    results = dist_pool(8).run(
        "tests.test_sp_methods:case_all_methods", layout="zigzag", chunk_len=3, forms=(), docs=("gdn",)
    )
    for rank, per_method in enumerate(results):
        for method, per_form in per_method.items():
            for (form, _), r in per_form.items():
                _expect(method, "zigzag", 8, form, rank, r)
    _check_peaks(dist_pool, 8, B * H * (32 * 32 + 32 * 32) * 8, lasp2_above=10)


LATENCY_BOUND = dict(name="latency-bound", alpha_s=1e-3, busbw_bytes_per_s=1e15)
BANDWIDTH_BOUND = dict(name="bandwidth-bound", alpha_s=0.0, busbw_bytes_per_s=1e9)


def test_auto_picks_what_the_cost_model_prices_cheapest():
    """Fixed links: latency-bound at large W -> logscan (log W rounds); bandwidth-bound -> allscan (the
    state once, pipelined); a few tokens against a large state -> Ulysses; 256 H100s on NVLink -> logscan."""
    from lasp.sp.cost import LINEAR_CANDIDATES, PRESETS, Link, Shape, pick, use_link

    cands = list(LINEAR_CANDIDATES)
    gdn = lambda W, layout="zigzag", T=512: Shape(W, 1, T, 16, 16, 128, 128, layout, 2, "gdn")  # noqa: E731
    assert pick(cands, gdn(64), Link(**LATENCY_BOUND))[0] == "logscan"
    assert pick(cands, gdn(8), Link(**BANDWIDTH_BOUND))[0] == "allscan"
    assert (
        pick(cands, Shape(2, 1, 2, 16, 16, 128, 128, "contiguous", 4, "none"), Link(**BANDWIDTH_BOUND))[0]
        == "ulysses_linear"
    )
    best, cost = pick(cands, gdn(256, T=32768), PRESETS["nvlink4-h100"])
    assert best == "logscan" and cost["lasp2"] > 20 * cost["logscan"], cost
    with pytest.raises(ValueError, match="unknown link 'fast'.*nvlink4-h100"):
        use_link("fast")


def case_auto(link: dict):
    """sp_linear_attn(method="auto") on `link`: the point-to-point messages each rank receives, and what the
    "lasp.sp" logger said (twice the same call: logged once)."""
    import logging

    from lasp.sp.cost import Link, use_link

    rank, W = dist.get_rank(), dist.get_world_size()
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("lasp.sp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    use_link(Link(**link))
    try:
        q, k, v, do, _, _, args = _inputs("gdn", 4 * W)
        sh = lambda x: shard_sequence(x, rank=rank, world_size=W, layout="contiguous")  # noqa: E731
        extra = {a: sh(args[a]) for a in ("gate", "beta")}
        for _ in range(2):
            with p2p_log() as got:
                sp_linear_attn(sh(q), sh(k), sh(v), method="auto", layout="contiguous", **extra)
    finally:
        use_link(None)
        logger.removeHandler(handler)
    return {"p2p": list(got), "said": said}


def test_auto_runs_the_pick_and_says_so_once(dist_pool):
    """W = 4, contiguous, Gated DeltaNet: a latency-bound link runs logscan (2 rounds: the last rank hears
    twice), a bandwidth-bound one allscan (the state in 4 column blocks)."""
    for link, method, last_rank_messages in ((LATENCY_BOUND, "logscan", 2), (BANDWIDTH_BOUND, "allscan", 4)):
        res = dist_pool(4).run("tests.test_sp_methods:case_auto", link=link)
        assert len(res[3]["p2p"]) == last_rank_messages, (method, res[3])
        assert len(res[0]["said"]) == 1 and f"-> {method} on {link['name']}" in res[0]["said"][0], res[0]["said"]
