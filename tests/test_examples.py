"""The worked examples (examples/hybrid_step.py and the README's) run on 2 processes of the shared gloo
pool, each as its own script would under torchrun, and agree with one process."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def case_script(code: str, name: str) -> str:
    """Runs a script's text as `__main__` on this rank and returns what it printed. The pool's process
    group stands in for the one the script starts and ends itself (torchrun's environment would give the
    same world: these ranks, gloo)."""
    import contextlib
    import io

    import torch.distributed as dist

    out = io.StringIO()
    own = {n: getattr(dist, n) for n in ("init_process_group", "destroy_process_group")}
    try:
        for n in own:
            setattr(dist, n, lambda *a, **kw: None)
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__main__", "__file__": name})
    finally:
        for n, fn in own.items():
            setattr(dist, n, fn)
    return out.getvalue()


def readme_example(readme: str) -> str:
    """The Python block under the README's "## Example" heading."""
    section = readme.split("\n## Example\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_hybrid_step_example(dist_pool):
    path = ROOT / "examples" / "hybrid_step.py"
    for out in dist_pool(2).run("tests.test_examples:case_script", code=path.read_text(), name=str(path)):
        found = re.findall(r"output ([0-9.e+-]+), input gradient ([0-9.e+-]+)", out)
        assert len(found) == 1, out
        assert all(float(o) < 1e-4 and float(g) < 1e-4 for o, g in found), found


def test_the_readme_example_runs_on_two_processes(dist_pool):
    """The README's example, as written there: each rank's LASP-2 output equals its shard of the one-device
    output to float32 precision, as its comment says."""
    code = readme_example((ROOT / "README.md").read_text())
    assert "lasp.lasp2_linear_attn" in code and "dist.init_process_group" in code
    outs = dist_pool(2).run("tests.test_examples:case_script", code=code, name="README.md example")
    for rank, out in enumerate(outs):
        found = re.fullmatch(r"(\d) tensor\(([0-9.e+-]+).*\)\n", out)
        assert found and int(found.group(1)) == rank and float(found.group(2)) < 1e-4, out
