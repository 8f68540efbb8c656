"""Triton kernels against the PyTorch path: on a GPU when there is one, else in Triton's CPU interpreter
(small sizes, float32: the interpreter's tl.dot is wrong on bf16)."""

import pytest
import torch

ON_GPU = torch.cuda.is_available()  # without one, conftest.py switched Triton to its interpreter
triton = pytest.importorskip("triton")

from lasp.kernels import TorchChunkKernel, get_kernel, linear_attn  # noqa: E402
from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel  # noqa: E402
from tests.dist import assert_close_rel  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DECAY = torch.tensor([-0.05, -0.7, 0.0])
REF = TorchChunkKernel(block=8, segment_blocks=2)


def _inputs(T, K, V, dtype=torch.float32, B=2, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V), mk(B, T, H, V), mk(B, H, K, V).float()


@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("T, K, V, block", [(1, 16, 16, 16), (37, 8, 12, 16), (70, 16, 32, 16), (64, 40, 24, 32),
                                           (16, 264, 16, 16)])
def test_protocol_matches_pytorch(T, K, V, block, decay):
    """Every method; in the interpreter the tiles are 16 wide, so K=40 / V=24 / V=32 cross tile borders."""
    tk = TritonChunkKernel(block=block)
    q, k, v, do, S = _inputs(T, K, V)
    g = DECAY.to(DEVICE) if decay else None
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
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
def test_linear_attn_with_states_through_triton(with_s0, want_final, decay):
    """The fused path: walks that start from the initial state and from the final state's gradient."""
    q, k, v, do, s0 = _inputs(45, 16, 24)
    args = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    ref = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    kw = dict(log_decay=DECAY.to(DEVICE) if decay else None, output_final_state=want_final)
    got = linear_attn(*args[:3], initial_state=args[3] if with_s0 else None, kernel=TritonChunkKernel(block=16), **kw)
    want = linear_attn(*ref[:3], initial_state=ref[3] if with_s0 else None, kernel=REF, **kw)
    got, want = (list(x) if want_final else [x] for x in (got, want))
    ((got[0] * do).sum() + (got[1].square().sum() if want_final else 0)).backward()
    ((want[0] * do).sum() + (want[1].square().sum() if want_final else 0)).backward()
    n = 4 if with_s0 else 3
    for a, b in zip(got + [x.grad for x in args[:n]], want + [x.grad for x in ref[:n]]):
        assert_close_rel(a, b, 2e-5)


HALF_CASES = [  # (dtype, T, D): fp16 also in the interpreter (small); its tl.dot is wrong on bf16 only
    pytest.param(torch.float16, 70, 32, id="fp16-small"),
    *[pytest.param(dt, 1000, D, id=f"{str(dt)[6:]}-D{D}",
                   marks=pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU"))
      for dt in (torch.bfloat16, torch.float16) for D in (64, 128)],
]


@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("dtype, T, D", HALF_CASES)
def test_half_precision(dtype, T, D, decay):
    """16-bit forward and backward with states (products in the input dtype, fp32 accumulation),
    against the fp32 PyTorch path on the same inputs."""
    q, k, v, do, s0 = _inputs(T, D, D, dtype=dtype)
    g = DECAY.to(DEVICE) if decay else None
    got = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    ref = [x.float().clone().requires_grad_() for x in (q, k, v, s0)]
    o, sT = linear_attn(*got[:3], log_decay=g, initial_state=got[3], output_final_state=True,
                        kernel=TritonChunkKernel(block=16 if T < 100 else 64))
    o_ref, sT_ref = linear_attn(*ref[:3], log_decay=g, initial_state=ref[3], output_final_state=True,
                                kernel=TorchChunkKernel())
    assert o.dtype == dtype and sT.dtype == torch.float32
    ((o.float() * do.float()).sum() + sT.sum()).backward()
    ((o_ref * do.float()).sum() + sT_ref.sum()).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for a, b in zip([o, sT] + [x.grad for x in got], [o_ref, sT_ref] + [x.grad for x in ref]):
        assert a.dtype in (dtype, b.dtype)
        assert_close_rel(a.float(), b, tol)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_runs_the_same_algorithm_on_triton_kernels(dist_pool, layout):
    if ON_GPU:
        pytest.skip("the gloo pool runs on CPU; on a GPU the protocol tests above cover the kernels")
    res = dist_pool(2).run(
        "tests.test_sp_linear:case_sp_linear", algo="lasp2", layout=layout, mode="decay", dtype="f32",
        chunk_len=21, K=16, V=16, backend="triton",
    )
    assert all(len(r["fwd"]) == 1 and len(r["bwd"]) == 1 for r in res)


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
