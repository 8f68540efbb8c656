"""Every launch `TritonChunkKernel` makes builds for the H100 (sm_90) with Triton's own compiler, here,
without a GPU (the interpreter tests run the kernels' Python, not their compilation), and the fixed
config's 16-bit builds need no register spills and run their products on Hopper's wgmma; the scalar gate's
launches (GATED) included."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_triton_launch_builds_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LASP_TRITON_AUTOTUNE"] = "0"  # the fixed config; `--all-configs` builds every tuned one
    # one build process per dtype, side by side (compiling is CPU-bound and single-threaded)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lasp.kernels.linear_attn.triton_aot",
                "--arch",
                "90",
                "--dtypes",
                dtype,
                "--no-spills",
                "--tensor-cores",
            ],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for dtype in ("bf16", "fp32")
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    builds = 0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-4000:] + err[-4000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("sm_90: ") and " 0 failures" in last, last
        builds += int(last.split()[1])
    assert builds >= 100, builds  # both dtypes, every flag combination the class launches
    for out, _ in outs:  # the scalar gate's, in each dtype
        built = {line.split()[1] for line in out.splitlines() if line.startswith("ok ") and "GATED" in line}
        assert built == {"walk_fwd", "walk_bwd", "walk_both", "chunk_out", "chunk_dqk"}, built
