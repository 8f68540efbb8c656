"""`predict`: modelled training steps of a whole model at W ranks and N tokens, for every SP method.

A step per rank is the model's compute on its T = N / W tokens plus, for each attention layer, the part of
its messages the method does not hide (`cost.layer_time`), on a link preset. Compute comes from the model's
FLOPs (lasp.train.flops: forward + backward per token, attention included) at an assumed sustained rate
(`--tflops`, per device): the same for every method, since they compute the same thing. No overlap is
credited to LASP-2 (its intra-chunk window is not known without a GPU measurement), so its figures are a
lower bound. These figures are MODELLED, not measured.

Pure linear models compare LASP-2, LASP-1, Ulysses and Ring (linear layers in the quadratic form, as the
LASP-2 paper ran it: its compute is counted as softmax attention's) on their linear layers; hybrids pair
each with its softmax counterpart (LASP-2 + LASP-2H, LASP-1 + Ring, Ulysses + Ulysses, Ring + Ring).
"""

import dataclasses

from lasp.model.config import ModelConfig
from lasp.sp.cost import Compute, Link, Shape, layer_time
from lasp.train.flops import flops_per_token

PAIRS = {
    "lasp2": ("lasp2", "lasp2h"),
    "lasp1": ("lasp1", "ring"),
    "ulysses": ("ulysses_linear", "ulysses"),
    "ring": ("ring_linear_quadratic", "ring"),
}
QUADRATIC = {"ring"}  # its linear layers compute in the quadratic form: FLOPs as softmax layers

# What the LASP-2 paper reports (Sun et al. 2025, arXiv 2502.07563): Linear-Llama3-1B, 64 A100 GPUs,
# sequence length 2048K: LASP-2's training throughput is 15.2% above LASP-1's and 36.6% above Ring
# Attention's. (Its Ring baseline ran linear attention in the quadratic form.)
PAPER_RATIOS_2048K_64 = {"lasp1": 1.152, "ring": 1.366}


def step(
    model: ModelConfig,
    method: str,
    W: int,
    N: int,
    link: Link,
    tflops: float,
    batch: int = 1,
    itemsize: int = 2,
    layout: str = "zigzag",
) -> dict:
    """Seconds of one training step per rank and tokens/s for the whole group (modelled)."""
    T = N // W
    counted = dataclasses.replace(model, layer_pattern="S") if method in QUADRATIC else model
    compute = flops_per_token(counted, N) * batch * T / (tflops * 1e12)
    hd = model.hidden_size // model.num_heads
    shape = Shape(W, batch, T, model.num_heads, model.num_kv_heads, hd, hd, layout, itemsize)
    linear = sum(model.mixer(layer) == "L" for layer in range(model.num_layers))
    comm = sum(
        count * layer_time(op, shape, Compute(0.0, 0.0), link)["step"]
        for op, count in zip(PAIRS[method], (linear, model.num_layers - linear))
        if count
    )
    total = compute + comm
    return {
        "method": method,
        "W": W,
        "N": N,
        "T": T,
        "compute_s": compute,
        "comm_s": comm,
        "step_s": total,
        "tokens_per_s": batch * N / total,
        "tokens_per_s_per_gpu": batch * N / total / W,
        "link": link.name,
        "tflops_assumed": tflops,
        "modelled": True,
    }


def sweep(
    model: ModelConfig, world_sizes: list[int], seq_lens: list[int], link: Link, tflops: float, batch: int = 1
) -> list[dict]:
    rows = []
    for W in world_sizes:
        for N in seq_lens:
            if N % (2 * W):
                continue
            for method in PAIRS:
                if method == "ulysses" and model.num_heads % W:
                    rows.append({"method": method, "W": W, "N": N, "skipped": f"{model.num_heads} heads % W={W}"})
                    continue
                rows.append(step(model, method, W, N, link, tflops, batch))
    return rows


def plot(rows: list[dict], path, W: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    mine = [r for r in rows if r.get("W") == W and "skipped" not in r]
    for method in PAIRS:
        pts = sorted((r["N"], r["tokens_per_s"]) for r in mine if r["method"] == method)
        if not pts:
            continue
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    a.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="tokens/s (modelled)", title=f"W = {W}")
    a.legend(fontsize=8)
    lasp2 = {r["N"]: r["tokens_per_s"] for r in mine if r["method"] == "lasp2"}
    for method in ("lasp1", "ulysses", "ring"):
        pts = sorted(
            (N, lasp2[N] / r["tokens_per_s"]) for r in mine if r["method"] == method for N in [r["N"]] if N in lasp2
        )
        if not pts:  # Ulysses where the heads do not divide
            continue
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"LASP-2 / {method}, modelled")
    for name, ratio in PAPER_RATIOS_2048K_64.items():
        b.scatter([2048 * 1024], [ratio], marker="*", s=120, label=f"paper, LASP-2 / {name} (64 A100, 2048K)")
    b.axhline(1.0, color="k", lw=0.6)
    b.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length N",
        ylabel="throughput ratio (log)",
        title="LASP-2 over the others",
    )
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
