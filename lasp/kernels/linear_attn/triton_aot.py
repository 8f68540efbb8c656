"""Compile, without a GPU, every Triton launch `TritonChunkKernel` makes, for an NVIDIA architecture.

    python -m lasp.kernels.linear_attn.triton_aot [--arch 90] [--dtypes bf16 fp32] [--all-configs]

Triton's interpreter runs the kernels' Python, not their compilation, so errors only a real build finds
(an unsupported construct, a type that does not lower, a tile that needs more shared memory than the GPU
has) would first show on a GPU. This calls each protocol method with CPU tensors while recording the
launches instead of running them, then builds each launch for the target with Triton's own compiler
(ptxas included) and reports its shared memory, and with `--registers` its registers and spill stack
(cuobjdump); `--no-spills` fails a 16-bit build that spills (fp32 inputs, three TF32 products each,
need more registers: a precision path, not a speed one), and `--tensor-cores` one whose products are
not Hopper warpgroup MMAs (wgmma) on sm_90. Run it with TRITON_INTERPRET unset. `--all-configs`
builds every autotuning config, not only the first (the fixed one under LASP_TRITON_AUTOTUNE=0).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)


def record_launches(dtype: torch.dtype, T: int = 100, D: int = 128) -> list[tuple]:
    """(autotuner, args, kwargs) of every launch the protocol methods make (the scalar gate's included),
    without running any."""
    from triton.runtime.autotuner import Autotuner

    from lasp.kernels.linear_attn.triton_chunk import TritonChunkKernel

    launches = []
    run = Autotuner.run
    Autotuner.run = lambda self, *args, **kwargs: launches.append((self, args, kwargs))
    try:
        tk, g = TritonChunkKernel(), -torch.linspace(0.1, 0.5, 2)
        q, k, v, do = (torch.zeros(1, T, 2, D, dtype=dtype) for _ in range(4))
        S = torch.zeros(1, 2, D, D)
        for decay in (g, None):
            tk.chunk_state(k, v, decay)
            tk.chunk_state_bwd(k, v, decay, S)
            tk.inter_fwd(q, S, decay, 0.1)
            tk.inter_bwd(q, S, decay, 0.1, do)
            for s0, final in ((None, False), (S, True), (S, False), (None, True)):
                tk.fwd(q, k, v, decay, 0.1, s0, final)
                tk.bwd(q, k, v, decay, 0.1, s0, do, S if final else None)
        gate = torch.zeros(1, T, 2, 1)  # the scalar gate's launches (GATED)
        tk.gated_chunk_state(k, v, gate)
        tk.gated_chunk_state_bwd(k, v, gate, S)
        tk.gated_inter_fwd(q, gate, S, 0.1)
        tk.gated_inter_bwd(q, gate, S, 0.1, do)
        for s0, final in ((None, False), (S, True), (S, False), (None, True)):
            tk.gated_fwd(q, k, v, gate, 0.1, s0, final)
            tk.gated_bwd(q, k, v, gate, 0.1, s0, do, S if final else None)
    finally:
        Autotuner.run = run
    return launches


def _source(tuner, args, kwargs, config):
    from triton.compiler import ASTSource

    fn = tuner.fn
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    values |= config.kwargs
    signature, constants, attrs = {}, {}, {}
    for p in fn.params:
        val = values[p.name]
        if p.is_constexpr:
            signature[p.name], constants[p.name] = "constexpr", val
        elif isinstance(val, torch.Tensor):
            signature[p.name] = "*" + TYPE_NAMES[val.dtype]
            aligned = val.data_ptr() % 16 == 0
        elif isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={val!r}")
        else:
            signature[p.name] = "i32" if isinstance(val, int) else "fp32"
            aligned = isinstance(val, int) and val % 16 == 0 and not p.do_not_specialize
        if not p.is_constexpr and aligned:  # what a launch specialises on: vector loads, async copies
            attrs[(p.num,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of a cubin, read by the cuobjdump that ships with Triton."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lasp.kernels.linear_attn.triton_aot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--registers", action="store_true", help="report registers and spills (cuobjdump)")
    p.add_argument(
        "--no-spills", action="store_true", help="fail a bf16/fp16 build that spills registers (implies --registers)"
    )
    p.add_argument("--tensor-cores", action="store_true", help="fail a bf16/fp16 sm_90 build without wgmma")
    args = p.parse_args(argv)
    from lasp.kernels import settings

    if settings.TRITON_INTERPRET:
        p.error("TRITON_INTERPRET=1 replaces the kernels with the interpreter's; run with it unset")
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    seen, built, failed, t0 = set(), 0, 0, time.time()
    for name in args.dtypes:
        for tuner, a, kw in record_launches(DTYPES[name]):
            for config in tuner.configs if args.all_configs else tuner.configs[:1]:
                src = _source(tuner, a, kw, config)
                key = (src.hash(), config.num_warps, config.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                flags = {k: v for k, v in src.constants.items() if isinstance(v, bool) and v}
                tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
                what = (
                    f"{tuner.fn.__name__:10s} {name} {tiles} warps={config.num_warps} stages={config.num_stages} "
                    f"{','.join(sorted(tuner.fn.arg_names[i[0]] for i in flags))}"
                )
                try:
                    kernel = triton.compile(src, target=target, options=config.all_kwargs())
                except Exception as e:  # report every failure, then fail
                    failed += 1
                    print(f"FAILED {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                    continue
                shared = kernel.metadata.shared
                verdict = "TOO BIG" if shared > MAX_SHARED.get(args.arch, 232448) else "ok"
                usage = ""
                if args.registers or args.no_spills:
                    res = resource_usage(kernel.asm["cubin"])
                    usage = f", {res['REG']} registers, spill stack {res['STACK']} B"
                    if args.no_spills and res["STACK"] and name != "fp32":
                        verdict = "SPILLS"
                wgmma = kernel.asm["ptx"].count("wgmma.mma_async")
                usage += f", {wgmma} wgmma"
                if args.tensor_cores and args.arch >= 90 and name != "fp32" and not wgmma:
                    verdict = "NO MMA"
                failed += verdict != "ok"
                built += 1
                print(f"{verdict:7s} {what} shared {shared} B{usage}", flush=True)
    print(f"sm_{args.arch}: {built} builds, {failed} failures, {time.time() - t0:.0f} s")
    return 1 if failed or not built else 0


if __name__ == "__main__":
    sys.exit(main())
