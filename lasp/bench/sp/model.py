"""`model`: the cost model against the measured points, and its predictions.

Compute per rank comes from `simulate` (the slowest rank's forward and backward, and LASP-2's overlapped
intra-chunk time). Simulated concurrently (`--concurrent`), the W ranks shared the machine as in the run;
simulated one at a time on a CPU whose W processes share fewer cores, each process would get cores / W of
a core, so that compute is scaled by max(1, W / cores). Communication comes from the link: fitted to the
sweep's calibration (least squares over all its sizes and W), or a preset. The prediction for each measured
(method, W, N) is printed beside the measurement with its error.
"""

import json
import statistics
from pathlib import Path

import torch

from lasp.bench.sp.methods import DTYPES
from lasp.sp.cost import PRESETS, Compute, Link, Shape, fit_link, layer_time


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the step that writes it first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(r: dict) -> tuple:
    return (r["method"], r["W"], r["N"], r["B"], r["H"], r["Hkv"], r["D"], r["layout"], r["dtype"])


def by_case(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if "skipped" not in r:
            out.setdefault(_key(r), []).append(r)
    return out


def link_for(name: str, calibration: list[dict], overlap: float) -> Link:
    if name == "fit":
        return fit_link([(c["kind"], c["W"], c["nbytes"], c["seconds"]) for c in calibration], "fitted", overlap)
    return PRESETS[name]


def shape_of(key: tuple) -> Shape:
    method, W, N, B, H, Hkv, D, layout, dtype = key
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return Shape(W, B, N // W, H, Hkv, D, D, layout, itemsize)


def compute_of(sim_rows: list[dict], contention: float) -> Compute:
    """The slowest simulated rank's compute, scaled for shared cores."""
    return Compute(
        fwd=contention * max(r["fwd_s"] for r in sim_rows),
        bwd=contention * max(r["bwd_s"] for r in sim_rows),
        fwd_overlap=contention * max(r["fwd_overlap_s"] for r in sim_rows),
        bwd_overlap=contention * max(r["bwd_overlap_s"] for r in sim_rows),
    )


def validate(measured: list[dict], simulated: list[dict], link: Link, cores: int | None) -> list[dict]:
    """For every measured case with a simulation: the measured step (slowest rank's median), the predicted
    one, and the relative error."""
    sims = by_case(simulated)
    out = []
    for key, rows in sorted(by_case(measured).items()):
        if key not in sims:
            continue
        W = key[1]
        # a concurrent simulation shared the machine as the run did; one rank at a time did not
        in_turn = any(r.get("simulated") != "concurrent" for r in sims[key])
        contention = max(1.0, W / cores) if cores and in_turn else 1.0
        pred = layer_time(key[0], shape_of(key), compute_of(sims[key], contention), link)
        got = max(r["step_s"] for r in rows)
        out.append(
            {
                "method": key[0],
                "W": W,
                "N": key[2],
                "measured_s": got,
                "predicted_s": pred["step"],
                "error": (pred["step"] - got) / got,
                "contention": contention,
                "link": link.name,
                "predicted_comm_s": pred["comm_fwd"] + pred["comm_bwd"],
            }
        )
    return out


def table(rows: list[dict]) -> str:
    lines = ["| method | W | N | measured ms | predicted ms | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['W']} | {r['N']} | {r['measured_s'] * 1e3:.1f} | "
            f"{r['predicted_s'] * 1e3:.1f} | {100 * r['error']:+.1f}% |"
        )
    errs = [abs(r["error"]) for r in rows]
    if errs:
        lines.append(
            f"\nmedian |error| {100 * statistics.median(errs):.1f}%, largest {100 * max(errs):.1f}%, "
            f"{sum(e <= 0.2 for e in errs)}/{len(errs)} within 20%"
        )
    return "\n".join(lines)
