"""Every launch `TritonChunkKernel` makes builds for the H100 (sm_90) with Triton's own compiler, here,
without a GPU (the interpreter tests run the kernels' Python, not their compilation), and the fixed
config's 16-bit builds need no register spills and run their products on Hopper's wgmma; the scalar gate's
launches (GATED) included."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_triton_launch_builds_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LASP_TRITON_AUTOTUNE"] = "0"  # the fixed config; `--all-configs` builds every tuned one
    cmd = [sys.executable, "-m", "lasp.kernels.linear_attn.triton_aot", "--arch", "90", "--dtypes", "bf16", "fp32",
           "--no-spills", "--tensor-cores"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("sm_90: ") and " 0 failures" in last, last
    assert int(last.split()[1]) >= 100, last  # both dtypes, every flag combination the class launches
    built = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("ok ") and "GATED" in line}
    assert built == {"walk_fwd", "walk_bwd", "walk_both", "chunk_out", "chunk_dqk"}, built  # the scalar gate's
