"""Triton kernels against the PyTorch path: on a GPU when there is one, else in Triton's CPU interpreter
(small sizes, float32: the interpreter's tl.dot is wrong on bf16)."""

import pytest
import torch

ON_GPU = torch.cuda.is_available()  # without one, conftest.py switched Triton to its interpreter
triton = pytest.importorskip("triton")

from lasp.kernels import TorchChunkKernel, get_kernel, linear_attn  # noqa: E402
from lasp.kernels.linear_attn import gated  # noqa: E402
from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel  # noqa: E402
from tests.dist import assert_close_rel  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DECAY = torch.tensor([-0.05, -0.7, 0.0])
GATE_STRENGTH = torch.tensor([0.0, 0.1, 2.0])  # per head: no decay, slow, fast (exp(-2 * 45) underflows)
REF = TorchChunkKernel(block=8, segment_blocks=2)


def _inputs(T, K, V, dtype=torch.float32, B=2, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V), mk(B, T, H, V), mk(B, H, K, V).float()


def _gate(B, T, H=3, dtype=torch.float32, seed=1):
    """A scalar log-gate [B, T, H], a different strength per head."""
    u = torch.rand(B, T, H, generator=torch.Generator().manual_seed(seed))
    return (-u * GATE_STRENGTH[:H]).to(DEVICE, dtype)


def _modes(*extra):
    return pytest.mark.parametrize("mode", ["nodecay", "decay", *extra])


def _decay_and_gate(mode, B, T, dtype=torch.float32):
    """(log_decay, gate) of a test mode: neither, the constant decay, or the scalar gate."""
    return DECAY.to(DEVICE) if mode == "decay" else None, _gate(B, T, dtype=dtype) if mode == "gate" else None


@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize(
    "T, K, V, block, B, H",
    [
        (1, 16, 16, 16, 1, 3),
        (37, 8, 12, 16, 2, 3),
        (70, 16, 32, 16, 1, 3),
        (64, 40, 24, 32, 1, 3),
        (16, 264, 16, 16, 1, 1),
    ],
)
def test_protocol_matches_pytorch(T, K, V, block, B, H, decay):
    """Every method; in the interpreter the tiles are 16 wide, so K=40 / V=24 / V=32 cross tile borders,
    and K=264 (17 tiles) has no head-dim limit. The interpreter runs one program per (row, head, chunk)
    at a time, so only T=37 takes a second row (batch strides); the others take one."""
    tk = TritonChunkKernel(block=block)
    q, k, v, do, S = _inputs(T, K, V, B=B, H=H)
    g = DECAY[:H].to(DEVICE) if decay else None
    pairs = [
        ([tk.chunk_state(k, v, g)], [REF.chunk_state(k, v, g)]),
        ([tk.intra_fwd(q, k, v, g, 0.3)], [REF.intra_fwd(q, k, v, g, 0.3)]),
        ([tk.inter_fwd(q, S, g, 0.3)], [REF.inter_fwd(q, S, g, 0.3)]),
        (tk.inter_bwd(q, S, g, 0.3, do), REF.inter_bwd(q, S, g, 0.3, do)),
        (tk.chunk_state_bwd(k, v, g, S), REF.chunk_state_bwd(k, v, g, S)),
        (tk.intra_bwd(q, k, v, g, 0.3, do), REF.intra_bwd(q, k, v, g, 0.3, do)),
    ]
    for got, want in pairs:
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close_rel(a, b, 2e-5)


@pytest.mark.parametrize("with_s0, want_final", [(True, True), (True, False), (False, True)])
@_modes("gate")
def test_linear_attn_with_states_through_triton(with_s0, want_final, mode):
    """The fused path: walks that start from the initial state and from the final state's gradient; with
    the scalar gate, its gradient too (the final state's term included)."""
    q, k, v, do, s0 = _inputs(45, 16, 24)
    log_decay, gate = _decay_and_gate(mode, 2, 45)
    inputs = (q, k, v, s0) + (() if gate is None else (gate,))
    args = [x.clone().requires_grad_() for x in inputs]
    ref = [x.clone().requires_grad_() for x in inputs]
    kw = dict(log_decay=log_decay, output_final_state=want_final)
    got = linear_attn(
        *args[:3],
        initial_state=args[3] if with_s0 else None,
        gate=args[4] if gate is not None else None,
        kernel=TritonChunkKernel(block=16),
        **kw,
    )
    want = linear_attn(
        *ref[:3], initial_state=ref[3] if with_s0 else None, gate=ref[4] if gate is not None else None, kernel=REF, **kw
    )
    got, want = (list(x) if want_final else [x] for x in (got, want))
    ((got[0] * do).sum() + (got[1].square().sum() if want_final else 0)).backward()
    ((want[0] * do).sum() + (want[1].square().sum() if want_final else 0)).backward()
    grads = [i for i in range(len(inputs)) if i != 3 or with_s0]
    for a, b in zip(got + [args[i].grad for i in grads], want + [ref[i].grad for i in grads]):
        assert_close_rel(a, b, 2e-5)


@pytest.mark.parametrize("T, K, V, block", [(45, 16, 24, 16), (20, 40, 16, 32)])
def test_gated_protocol_matches_pytorch(T, K, V, block):
    """Every gated call against `gated.py` (the torch kernel's), with states, T not a multiple of the chunk,
    K != V, tiles crossed (K=40) and a chunk longer than T; values and dtypes."""
    tk = TritonChunkKernel(block=block)
    q, k, v, do, S = _inputs(T, K, V)
    dS = S.flip(-1).contiguous()
    g = _gate(2, T)[..., None]  # the protocol's [B, T, H, 1]
    pairs = [
        (tk.gated_fwd(q, k, v, g, 0.3, S, True), gated.gated_fwd(q, k, v, g, 0.3, S, True, 8, 2)),
        (tk.gated_bwd(q, k, v, g, 0.3, S, do, dS), gated.gated_bwd(q, k, v, g, 0.3, S, do, dS, 8, 2)),
        (tk.gated_bwd(q, k, v, g, 0.3, None, do, None)[:4], gated.gated_bwd(q, k, v, g, 0.3, None, do, None, 8, 2)[:4]),
        (tk.gated_chunk_state(k, v, g), gated.gated_chunk_state(k, v, g)),
        (tk.gated_chunk_state_bwd(k, v, g, dS), gated.gated_chunk_state_bwd(k, v, g, dS)),
        ([tk.gated_inter_fwd(q, g, S, 0.3)], [gated.gated_inter_fwd(q, g, S, 0.3)]),
        (tk.gated_inter_bwd(q, g, S, 0.3, do), gated.gated_inter_bwd(q, g, S, 0.3, do)),
    ]
    for got, want in pairs:
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close_rel(a, b, 2e-5)


def test_gate_forms_the_triton_kernel_lacks_are_clear_errors():
    q = torch.zeros(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="no vector gate"):
        linear_attn(q, q, q, gate=torch.zeros(1, 4, 1, 16, device=DEVICE), kernel=TritonChunkKernel())
    with pytest.raises(ValueError, match="no reset"):
        linear_attn(
            q, q, q, gate=torch.tensor([[[0.0], [-torch.inf], [0.0], [0.0]]], device=DEVICE), kernel=TritonChunkKernel()
        )
    with pytest.raises(ValueError, match="scalar gate only"):
        TritonChunkKernel().gated_fwd(q, q, q, torch.zeros(1, 4, 1, 16, device=DEVICE), 1.0, None, False)


HALF_CASES = [  # (dtype, T, D): fp16 also in the interpreter (small); its tl.dot is wrong on bf16 only
    pytest.param(torch.float16, 70, 32, id="fp16-small"),
    *[
        pytest.param(
            dt, 1000, D, id=f"{str(dt)[6:]}-D{D}", marks=pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
        )
        for dt in (torch.bfloat16, torch.float16)
        for D in (64, 128)
    ],
]


@_modes("gate")
@pytest.mark.parametrize("dtype, T, D", HALF_CASES)
def test_half_precision(dtype, T, D, mode):
    """16-bit forward and backward with states (products in the input dtype, fp32 accumulation),
    against the fp32 PyTorch path on the same inputs (the gate's gradient included)."""
    B = 2 if ON_GPU else 1  # the interpreter runs programs one at a time; batch strides: the fp32 tests
    q, k, v, do, s0 = _inputs(T, D, D, dtype=dtype, B=B)
    g, gate = _decay_and_gate(mode, B, T, dtype)
    inputs = (q, k, v, s0) + (() if gate is None else (gate,))
    got = [x.clone().requires_grad_() for x in inputs]
    ref = [x.float().clone().requires_grad_() for x in inputs]
    o, sT = linear_attn(
        *got[:3],
        log_decay=g,
        gate=got[4] if gate is not None else None,
        initial_state=got[3],
        output_final_state=True,
        kernel=TritonChunkKernel(block=16 if T < 100 else 64),
    )
    o_ref, sT_ref = linear_attn(
        *ref[:3],
        log_decay=g,
        gate=ref[4] if gate is not None else None,
        initial_state=ref[3],
        output_final_state=True,
        kernel=TorchChunkKernel(),
    )
    assert o.dtype == dtype and sT.dtype == torch.float32
    ((o.float() * do.float()).sum() + sT.sum()).backward()
    ((o_ref * do.float()).sum() + sT_ref.sum()).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for a, b in zip([o, sT] + [x.grad for x in got], [o_ref, sT_ref] + [x.grad for x in ref]):
        assert a.dtype in (dtype, b.dtype)
        assert_close_rel(a.float(), b, tol)


def test_lasp2_runs_the_same_algorithm_on_triton_kernels(dist_pool):
    """Zigzag: each rank runs two chunks that are not neighbours, each from its own incoming state (the
    contiguous layout's one chunk per rank is the simpler case; both layouts run on the torch kernel)."""
    if ON_GPU:
        pytest.skip("the gloo pool runs on CPU; on a GPU the protocol tests above cover the kernels")
    res = dist_pool(2).run(
        "tests.test_sp_linear:case_sp_linear",
        algo="lasp2",
        layout="zigzag",
        mode="decay",
        dtype="f32",
        chunk_len=21,
        K=16,
        V=16,
        B=1,
        backend="triton",
    )
    assert all(len(r["fwd"]) == 1 and len(r["bwd"]) == 1 for r in res)


def case_lasp2_gated_triton(layout, chunk_len, B=2, H=4, Hkv=2, K=16, V=24):
    """LASP-2 with the scalar gate on the Triton kernels against the token recurrence (float64, the whole
    sequence): the output and the gradients of q, k, v and the gate on this rank."""
    import torch.distributed as dist

    from lasp import SeqLayout, lasp2_linear_attn, shard_sequence
    from tests.test_sp_gated import gated_inputs, reference

    rank, W = dist.get_rank(), dist.get_world_size()
    q, k, v, gate, do = gated_inputs(B, chunk_len * SeqLayout(layout, W).num_chunks, H, Hkv, K, V, "scalar")
    o_ref, grads_ref = reference(q, k, v, gate, do)
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout).float()  # noqa: E731
    local = [shard(x).requires_grad_() for x in (q, k, v, gate)]
    o = lasp2_linear_attn(*local[:3], gate=local[3], layout=layout, kernel=TritonChunkKernel(block=16))
    o.backward(shard(do))
    errors = {"o": _relative(o, shard(o_ref))}
    errors.update(
        {
            f"d{name}": _relative(got.grad, shard(ref))
            for name, got, ref in zip(["q", "k", "v", "gate"], local, grads_ref)
        }
    )
    return errors


def _relative(got, want) -> float:
    """The largest difference relative to the reference's largest value."""
    return float((got.double() - want.double()).abs().max() / want.abs().max().clamp_min(1e-30))


def test_lasp2_gated_on_triton_kernels(dist_pool):
    """The LASP-2 pieces of the gate (chunk states and their transitions, the incoming states' term, the
    gate's gradient from the local backward) on 2 ranks, zigzag: chunks of 21 tokens, blocks of 16."""
    if ON_GPU:
        pytest.skip("the gloo pool runs on CPU; on a GPU the protocol tests above cover the kernels")
    res = dist_pool(2).run("tests.test_triton_kernels:case_lasp2_gated_triton", layout="zigzag", chunk_len=21, B=1)
    for errors in res:  # every rank's output and gradients, float32 against the float64 recurrence
        assert set(errors) == {"o", "dq", "dk", "dv", "dgate"}, errors
        assert all(e <= (1e-4 if name == "dgate" else 2e-5) for name, e in errors.items()), errors


def test_tile_configs_fit_the_head_dims(monkeypatch):
    """On a GPU every kernel autotunes over tiles; tiles wider than the head dims are pruned."""
    from lasp.kernels import settings
    from lasp.kernels.linear_attn import triton_kernels as tc

    monkeypatch.setattr(settings, "TRITON_INTERPRET", False)
    monkeypatch.setattr(settings, "TRITON_AUTOTUNE", True)
    tiles = [(64, 64), (128, 64), (64, 128), (128, 128)]
    full = tc._configs(tiles, (4, 8), (2, 3))
    assert len(full) == 16
    kept = tc._prune(full, {"K": 64}, V=128)
    assert {(c.kwargs["BK"], c.kwargs["BV"]) for c in kept} == {(64, 64), (64, 128)}
    assert [(c.kwargs["BK"], c.kwargs["BV"]) for c in tc._prune(full, {}, K=8, V=8)] == [(64, 64)]
    monkeypatch.setattr(settings, "TRITON_AUTOTUNE", False)
    assert len(tc._configs(tiles, (4, 8), (2, 3))) == 1


def test_every_launch_names_only_its_kernels_arguments():
    """A compiled launch rejects a keyword its kernel does not have (KeyError); the interpreter ignores it,
    so the CPU tests check every launch here (recorded as `triton_aot` records them for its builds),
    including the tuned meta-parameters."""
    from lasp.kernels.linear_attn.triton_aot import record_launches

    seen = set()
    for tuner, args, kwargs in record_launches(torch.float32, T=20, D=16):
        name, tuned = tuner.fn.__name__, set(tuner.configs[0].kwargs)
        extra = set(kwargs) - set(tuner.arg_names) - {"grid", "warmup"}
        assert not extra, f"{name} launched with unknown keywords {sorted(extra)}"
        assert not tuned & set(kwargs), f"{name} launched with tuned keywords {sorted(tuned & set(kwargs))}"
        assert len(args) + len(set(kwargs) & set(tuner.arg_names)) + len(tuned) == len(tuner.arg_names), name
        seen.add(name)
    assert seen == {"walk_fwd", "walk_bwd", "walk_both", "chunk_out", "chunk_dqk"}


def test_float64_is_a_clear_error():
    q = torch.zeros(1, 4, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        TritonChunkKernel().intra_fwd(q, q, q, None, 1.0)


def test_backend_choice():
    assert get_kernel("torch").name == "torch"
    assert get_kernel("auto").name == ("triton" if ON_GPU else "torch")
    assert get_kernel("triton").name == "triton"  # a GPU, or the interpreter this module switched on
    with pytest.raises(ValueError, match="one of auto, torch, triton"):
        get_kernel("cuda")


def test_triton_without_gpu_is_a_clear_error(monkeypatch):
    if ON_GPU:
        pytest.skip("a GPU is present")
    from lasp.kernels import settings

    monkeypatch.setattr(settings, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        get_kernel("triton")
