"""The fla backend (lasp.kernels.linear_attn.fla_kernel): every protocol call composed from one chunk op per form.
fla's kernels do not run on CPU, so here FlaKernel gets stand-ins with fla's signatures (lasp's own torch path):
what is checked is the composition (zeroed inputs, the identity as a state, the backward by recomputation), in
float64, on one device and under LASP-2 on 2 processes, for every form. On a GPU, tests/test_gpu_stream.py's
fla cases compare the real ops with the torch path."""

import pytest
import torch
import torch.distributed as dist

from lasp import linear_attn, shard_sequence, sp_linear_attn
from lasp.kernels import get_kernel
from lasp.kernels.linear_attn.fla_kernel import FlaKernel, FlaOps


def _op(**form):
    def op(q, k, v, g=None, g_gamma=None, beta=None, scale=None, initial_state=None, output_final_state=False):
        out = linear_attn(
            q,
            k,
            v,
            gate=g,
            log_decay=g_gamma,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
        return out if output_final_state else (out, None)

    return op


STAND_INS = FlaOps(simple_gla=_op(), gla=_op(), delta_rule=_op(), gated_delta_rule=_op(), kda=_op())
FORMS = ["none", "decay", "scalar", "vector", "deltanet", "gdn", "kda"]
B, H, K, V = 2, 3, 6, 5


def inputs(form: str, T: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, s0 = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, H, K, V)
    kw = {}
    if form == "decay":
        kw["log_decay"] = -torch.linspace(0.05, 0.5, H, dtype=torch.float64)
    if form in ("deltanet", "gdn", "kda"):
        k = torch.nn.functional.normalize(k, dim=-1)
        kw["beta"] = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 1.5 + 0.1
    if form in ("scalar", "gdn"):
        kw["gate"] = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.5
    if form in ("vector", "kda"):
        kw["gate"] = -torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) * 0.5
    return q, k, v, s0, kw


@pytest.mark.parametrize("form", FORMS)
def test_every_form_matches_the_torch_path_on_one_device(form):
    q, k, v, s0, kw = inputs(form, 37)
    grads = {}
    for name, kernel in (("torch", None), ("fla", FlaKernel(STAND_INS))):
        xs = [x.clone().requires_grad_() for x in (q, k, v, s0)]
        extra = {n: (x.clone().requires_grad_() if n != "log_decay" else x) for n, x in kw.items()}
        o, final = linear_attn(*xs[:3], initial_state=xs[3], output_final_state=True, kernel=kernel, **extra)
        (o.sum() + (final * final).sum()).backward()
        grads[name] = [o, final, *(x.grad for x in xs), *(x.grad for n, x in extra.items() if n != "log_decay")]
    for a, b in zip(grads["fla"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def case_lasp2_on_the_fla_kernel(layout: str):
    """Each form under LASP-2 (the chunks' affine pieces from FlaKernel) against one device's torch path."""
    rank, W = dist.get_rank(), dist.get_world_size()
    shard = lambda x: shard_sequence(x, rank=rank, world_size=W, layout=layout)  # noqa: E731
    for form in FORMS:
        q, k, v, _, kw = inputs(form, 4 * W * 3, seed=1)
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        fkw = {n: (x.clone().requires_grad_() if n != "log_decay" else x) for n, x in kw.items()}
        o_ref = linear_attn(*full, **fkw)
        do = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        o_ref.backward(do)
        mine = [shard(x).clone().requires_grad_() for x in (q, k, v)]
        mkw = {n: (shard(x).clone().requires_grad_() if n != "log_decay" else x) for n, x in kw.items()}
        o = sp_linear_attn(*mine, method="lasp2", layout=layout, kernel=FlaKernel(STAND_INS), **mkw)
        o.backward(shard(do))
        torch.testing.assert_close(o, shard(o_ref), rtol=1e-10, atol=1e-10, msg=lambda m, f=form: f"{f}: o: {m}")
        pairs = [*zip(mine, full), *((mkw[n], fkw[n]) for n in kw if n != "log_decay")]
        for got, want in pairs:
            torch.testing.assert_close(
                got.grad, shard(want.grad), rtol=1e-9, atol=1e-10, msg=lambda m, f=form: f"{f}: {m}"
            )


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_lasp2_runs_every_form_on_the_fla_kernel(dist_pool, layout):
    dist_pool(2).run("tests.test_fla_kernel:case_lasp2_on_the_fla_kernel", layout=layout)


def test_asking_for_fla_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(RuntimeError, match="kernel backend 'fla' needs a CUDA GPU"):
        get_kernel("fla")
    with pytest.raises(ValueError, match="document resets"):
        q, k, v, _, kw = inputs("scalar", 9)
        linear_attn(q, k, v, cu_seqlens=[0, 4], kernel=FlaKernel(STAND_INS), **kw)


def test_auto_takes_fla_only_for_what_triton_lacks():
    from lasp.kernels.backend import covers
    from lasp.kernels.protocol import Capabilities
    from lasp.train.config import resolve
    from lasp.train.loop import _needs

    triton = Capabilities(gates=("scalar",))
    needs = {
        v: _needs(resolve({"model": {"linear_variant": v}}, "x.yaml", 1, check_data=False))
        for v in ("lightning", "simple_gla", "gla", "gated_deltanet")
    }
    assert [covers(triton, n) for n in needs.values()] == [True, True, False, False]
    assert all(covers(FlaKernel.caps, n) for n in needs.values())
    documents = _needs(resolve({"data": {"reset_at_documents": True}}, "x.yaml", 1, check_data=False))
    assert not covers(triton, documents) and not covers(FlaKernel.caps, documents)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fla's kernels do not run on CPU)")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("form", FORMS)
def test_flas_kernels_follow_the_torch_path_on_a_gpu(form, dtype, tol):
    """The real fla ops behind the protocol against lasp's torch path (in float32), on one GPU: outputs, final
    states and every gradient, relative to each tensor's largest value."""
    q, k, v, s0, kw = inputs(form, 300)
    grads = {}
    for name, kernel, dt in (("torch", None, torch.float32), ("fla", FlaKernel(), dtype)):
        xs = [x.to("cuda", dt).requires_grad_() for x in (q, k, v)] + [s0.to("cuda", torch.float32).requires_grad_()]
        extra = {
            n: (x.to("cuda", dt).requires_grad_() if n != "log_decay" else x.to("cuda", torch.float32))
            for n, x in kw.items()
        }
        o, final = linear_attn(*xs[:3], initial_state=xs[3], output_final_state=True, kernel=kernel, **extra)
        (o.float().sum() + (final * final).sum()).backward()
        grads[name] = [o, final, *(x.grad for x in xs), *(x.grad for n, x in extra.items() if n != "log_decay")]
    for a, b in zip(grads["fla"], grads["torch"]):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-6), (form, dtype)
