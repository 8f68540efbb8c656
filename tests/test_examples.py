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
        "--standalone",  # a free port, not torchrun's fixed default
        "--nproc-per-node",
        "2",
        str(ROOT / "examples/hybrid_step.py"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.findall(r"output ([0-9.e+-]+), input gradient ([0-9.e+-]+)", run.stdout)
    assert len(found) == 2, run.stdout
    assert all(float(o) < 1e-4 and float(g) < 1e-4 for o, g in found), found


def readme_example(readme: str) -> str:
    """The Python block under the README's "## Example" heading."""
    section = readme.split("\n## Example\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_on_two_processes(tmp_path):
    """The README's example, as written there, under torchrun with 2 processes: each rank's LASP-2 output
    equals its shard of the one-device output to float32 precision, as its comment says."""
    code = readme_example((ROOT / "README.md").read_text())
    assert "lasp.lasp2_linear_attn" in code and "dist.init_process_group" in code
    (tmp_path / "example.py").write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "example.py"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.findall(r"tensor\(([0-9.e+-]+)", run.stdout)  # the two ranks' lines may interleave
    assert len(found) == 2 and all(float(x) < 1e-4 for x in found), run.stdout
