"""The scaling benchmark's figures, from its JSONL rows (matplotlib, no display)."""

from collections import Counter
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(measured: list[dict]) -> list[dict]:
    """One row per measured case: the slowest rank's step, the busiest rank's bytes and peak memory."""
    cases: dict[tuple, dict] = {}
    for r in measured:
        if "skipped" in r:
            continue
        key = (r["method"], r["W"], r["N"])
        sent = sum(received(m, r["W"]) for m in r["fwd_messages"] + r["bwd_messages"])
        c = cases.setdefault(
            key,
            {
                "method": r["method"],
                "W": r["W"],
                "N": r["N"],
                "step_s": 0.0,
                "bytes": 0,
                "tokens": r["B"] * r["N"],
                "peak_gib": 0.0,
            },
        )
        c["step_s"], c["bytes"] = max(c["step_s"], r["step_s"]), max(c["bytes"], sent)
        c["peak_gib"] = max(c["peak_gib"], r.get("peak_mem_gib") or 0.0)
    return list(cases.values())


def received(m: dict, W: int) -> float:
    """Bytes a rank receives in message m: (W-1)/W of a collective's buffer (the rest is its own), a hop's all."""
    return m["nbytes"] if m["kind"] == "p2p" else m["nbytes"] * (W - 1) / W


def _lines(ax, rows: list[dict], x: str, y, label_fmt: str = "{}") -> None:
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r[x], y(r)) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label_fmt.format(method))


def plot_all(out: Path, measured: list[dict], validation: list[dict]) -> list[Path]:
    plt = _plt()
    rows = _rows(measured)
    written = []
    if rows:
        W = max(r["W"] for r in rows)
        fig, ax = plt.subplots(figsize=(6, 4))
        _lines(ax, [r for r in rows if r["W"] == W], "N", lambda r: r["tokens"] / r["step_s"])
        ax.set(
            xscale="log",
            xlabel="sequence length N (tokens)",
            ylabel="tokens/s (one layer, fwd+bwd)",
            title=f"measured, W = {W}",
        )
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "tokens_vs_N.png"))

        mem = [r for r in rows if r["W"] == W and r["peak_gib"] > 0]
        if mem:
            fig, ax = plt.subplots(figsize=(6, 4))
            _lines(ax, mem, "N", lambda r: r["peak_gib"] * 2**10)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="sequence length N (tokens)",
                ylabel="peak MiB per rank above the inputs",
                title=f"measured (profiler), W = {W}",
            )
            ax.legend(fontsize=7)
            written.append(_save(fig, out / "memory_vs_N.png"))

        per_rank = Counter(r["N"] // r["W"] for r in rows if r["W"] > 1)
        if per_rank:
            t = per_rank.most_common(1)[0][0]
            fig, ax = plt.subplots(figsize=(6, 4))
            _lines(ax, [r for r in rows if r["N"] == t * r["W"]], "W", lambda r: r["tokens"] / r["step_s"])
            ax.set(xlabel="ranks W", ylabel="tokens/s (one layer, fwd+bwd)", title=f"measured, {t} tokens per rank")
            ax.legend(fontsize=7)
            written.append(_save(fig, out / "tokens_vs_W.png"))

        multi = [r for r in rows if r["W"] > 1]
        common = (
            set.intersection(*({r["N"] for r in multi if r["W"] == W} for W in {r["W"] for r in multi}))
            if multi
            else set()
        )
        if common:
            N = max(common)
            fig, ax = plt.subplots(figsize=(6, 4))
            _lines(ax, [r for r in multi if r["N"] == N], "W", lambda r: r["bytes"] / 2**20)
            ax.set(
                xlabel="ranks W",
                ylabel="MiB received per rank, fwd+bwd (profiler)",
                yscale="log",
                title=f"communication of the busiest rank, N = {N}",
            )
            ax.legend(fontsize=7)
            written.append(_save(fig, out / "bytes_vs_W.png"))
    if validation:
        fig, ax = plt.subplots(figsize=(5, 5))
        for method in sorted({r["method"] for r in validation}):
            pts = [r for r in validation if r["method"] == method]
            ax.scatter([r["measured_s"] * 1e3 for r in pts], [r["predicted_s"] * 1e3 for r in pts], label=method, s=14)
        hi = max(max(r["measured_s"], r["predicted_s"]) for r in validation) * 1e3 * 1.1
        lo = min(min(r["measured_s"], r["predicted_s"]) for r in validation) * 1e3 * 0.9
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [1.2 * lo, 1.2 * hi], "k:", lw=0.6)
        ax.plot([lo, hi], [0.8 * lo, 0.8 * hi], "k:", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="measured ms per layer step", ylabel="predicted ms")
        ax.set_title(f"cost model ({validation[0]['link']} link) vs measured, dotted +-20%", fontsize=9)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "validation.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
