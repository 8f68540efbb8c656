"""The GPU kernel benchmark's own logic, checked on CPU so a GPU session only has to run it: a toy run
(Triton in its interpreter) and the target summary on hand-made rows."""

import json

from lasp.bench import kernels


def test_toy_run_writes_rows_and_plot(tmp_path):
    out = tmp_path / "k"
    kernels.main(
        [
            "--device",
            "cpu",
            "--batch",
            "1",
            "--lengths",
            "32",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--reps",
            "1",
            "--check-len",
            "32",
            "--only",
            "lasp-triton (decay)",
            "lasp-torch",
            "--out",
            str(out),
        ]
    )
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["lasp-triton (decay)", "lasp-torch (decay)"]
    for r in rows:
        assert r["max_rel_err_vs_fp32"] < 1e-5 and r["fwd_bwd_s"] > 0 and r["T"] == 32 and r["git"]
    assert out.with_suffix(".png").stat().st_size > 0

    second = tmp_path / "k2.jsonl"
    second.write_text(json.dumps({**rows[0], "B": 4}) + "\n")
    kernels.main(["--from-jsonl", str(out.with_suffix(".jsonl")), str(second), "--out", str(tmp_path / "all")])
    merged = (tmp_path / "all.jsonl").read_text().splitlines()
    assert len(merged) == 3 and (tmp_path / "all.png").stat().st_size > 0


def _row(impl, B, T, s, mem=100):
    return {"impl": impl, "B": B, "T": T, "fwd_bwd_s": s, "peak_extra_bytes": mem}


def test_summary_compares_with_the_fastest_peer_and_checks_flatness():
    rows = [
        _row("lasp-triton (decay)", 1, 8192, 1.0),
        _row("lasp-triton (decay)", 1, 16384, 2.2),
        _row("fla chunk_simple_gla g_gamma (decay)", 1, 8192, 1.5, mem=50),
        _row("fla chunk_simple_gla g (decay)", 1, 8192, 1.2, mem=200),
        _row("fla chunk_linear_attn (no decay)", 1, 8192, 0.1),  # other math: never the peer
        {"impl": "fla chunk_simple_gla g (decay)", "B": 1, "T": 16384, "error": "out of memory"},
    ]
    lines = kernels.summary(rows)
    assert "fla chunk_simple_gla g (decay)" in lines[0] and "speed ratio 1.20" in lines[0]
    assert "memory 0.50x" in lines[0]
    assert lines[1] == "B=1: lasp-triton (decay) time per token over T=8192..131072 varies by 10.0% (max/min - 1)"
    assert len(lines) == 2
