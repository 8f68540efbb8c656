"""The worked examples in the README run and agree with one process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_hybrid_step_example():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(ROOT / "examples/hybrid_step.py"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.findall(r"output ([0-9.e+-]+), input gradient ([0-9.e+-]+)", run.stdout)
    assert len(found) == 2, run.stdout
    assert all(float(o) < 1e-4 and float(g) < 1e-4 for o, g in found), found
