"""What a run shows and leaves: a progress bar, metrics.jsonl, TensorBoard events and a loss plot.

Only rank 0 writes; the values it writes are global (the loss and gradient norm are reduced over every
rank before they get here).
"""

import json
import math
import os
import resource
import shutil
import sys
import time

import torch

COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gib")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Metrics:
    """Rank 0's writer. `log_step` / `log_eval` append JSONL rows (and TensorBoard scalars)."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, progress: bool, tensorboard: bool):
        self.enabled, self.run_dir = enabled, run_dir
        self.rows: list[dict] = []
        self._bar = self._tb = self._file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        # a new run replaces the outputs of an earlier one in the same directory (resume is not built yet)
        stale = [f for f in ("metrics.jsonl", "loss.png", "tensorboard") if os.path.exists(os.path.join(run_dir, f))]
        if stale:
            print(f"replacing the outputs of an earlier run in {run_dir}: {', '.join(stale)}", flush=True)
        for f in stale:
            path = os.path.join(run_dir, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "w", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.monotonic()

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def log_step(self, row: dict) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", **row})
        mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        text = (f"loss {row['loss']:.4f} | {row['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
                f"mem {row['mem_gib']:.2f} GiB")
        if self._bar is not None:
            self._bar.update(row["step"] - self._bar.n)
            self._bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {row['step']:>6} | {text} | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f}",
                  flush=True)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "eval_loss": loss})
        self.message(f"step {step:>6} | eval loss {loss:.4f}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self, plot: bool) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        if plot and self.rows:
            plot_losses(self.rows, os.path.join(self.run_dir, "loss.png"))


def plot_losses(rows: list[dict], path: str) -> None:
    """Train loss per step and eval loss at its steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
