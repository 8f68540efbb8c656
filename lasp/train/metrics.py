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

from lasp.train.ckpt_store import write_file

COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gib")


def moe_columns(stats: dict | None) -> dict:
    """The MoE layers' step statistics (lasp.parallel.ep.moe_step) as metrics columns: the balancing and
    z-losses summed over the layers, the worst load (max / mean tokens per expert), and each layer's
    (`moe_load_L3`: layer 3's max / mean). {} without MoE layers."""
    if not stats:
        return {}
    layers = [i for i, v in enumerate(stats["load_max_mean"]) if stats["aux_loss"][i] is not None]
    loads = [stats["load_max_mean"][i] for i in layers if stats["load_max_mean"][i] is not None]
    return {
        "moe_aux_loss": sum(stats["aux_loss"][i] for i in layers),
        "moe_z_loss": sum(stats["z_loss"][i] for i in layers),
        "moe_load_max": max(loads) if loads else None,
        **{f"moe_load_L{i}": stats["load_max_mean"][i] for i in layers},
        **{f"moe_aux_loss_L{i}": stats["aux_loss"][i] for i in layers},
    }


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Metrics:
    """Rank 0's writer. `log_step` / `log_eval` append JSONL rows (and TensorBoard scalars)."""

    def __init__(
        self,
        run_dir: str,
        enabled: bool,
        total_steps: int,
        progress: bool,
        tensorboard: bool,
        resume_step: int | None = None,
    ):
        """`resume_step`: the run continues from a checkpoint of that step; the rows of the earlier
        attempts up to it are kept (later ones, written after the checkpoint, are dropped). Otherwise a
        new run replaces the outputs of an earlier one in `run_dir`."""
        self.enabled, self.run_dir = enabled, run_dir
        self.rows: list[dict] = []
        self._bar = self._tb = self._file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None:
            # an earlier start's layout row at this very step is replaced by this start's
            self.rows = [
                r
                for r in read_rows(path)
                if r["step"] < resume_step or (r["step"] == resume_step and r["kind"] != "layout")
            ]
        else:
            stale = [
                f for f in ("metrics.jsonl", "loss.png", "tensorboard") if os.path.exists(os.path.join(run_dir, f))
            ]
            if stale:
                print(f"replacing the outputs of an earlier run in {run_dir}: {', '.join(stale)}", flush=True)
            for f in stale:
                full = os.path.join(run_dir, f)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
        write_file(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events an earlier attempt wrote after the checkpoint
            self._tb = SummaryWriter(
                os.path.join(run_dir, "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
            )
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, desc="train", unit="step", dynamic_ncols=True)
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
        text = f"loss {row['loss']:.4f} | {row['tokens_per_s']:,.0f} tok/s | mfu {mfu} | mem {row['mem_gib']:.2f} GiB"
        if row.get("moe_load_max") is not None:
            text += f" | moe aux {row['moe_aux_loss']:.4f}, load max/mean {row['moe_load_max']:.2f}"
        if self._bar is not None:
            self._bar.update(row["step"] - self._bar.n)
            self._bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {row['step']:>6} | {text} | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f}", flush=True)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "eval_loss": loss})
        self.message(f"step {step:>6} | eval loss {loss:.4f}")

    def log_layout(self, step: int, row: dict) -> None:
        """The layout this start runs on (world size, tp, sp, pp, dp, microbatches, why), at the step it starts
        from: every (re)start writes one, so a world that shrank or grew shows on the curves."""
        if not self.enabled:
            return
        self._write({"kind": "layout", "step": step, **row})

    def log_positions(self, step: int, buckets: list[dict]) -> None:
        """The held-out loss per position bucket (lasp.parallel.positions): one row, a column per bucket."""
        if not self.enabled:
            return
        self._write(
            {
                "kind": "eval_positions",
                "step": step,
                **{f"loss_{b['lo']}_{b['hi']}": b["loss"] for b in buckets},
                "tokens": sum(b["tokens"] for b in buckets),
            }
        )
        self.message(
            f"step {step:>6} | eval loss by position: "
            + ", ".join(f"{b['lo']}-{b['hi']} {b['loss']:.4f}" for b in buckets)
        )

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


def keep_rows_after(run_dir: str, step: int, dest: str) -> int:
    """Copy the metrics.jsonl rows of `run_dir` past `step` into `dest`/metrics.jsonl (a roll-back's
    abandoned branch keeps its history beside its checkpoints: resuming drops them from the run's file).
    Returns how many."""
    rows = [r for r in read_rows(os.path.join(run_dir, "metrics.jsonl")) if r.get("step", 0) > step]
    if rows:
        write_file(os.path.join(dest, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def read_rows(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a line cut short by a crash, or still being written, is dropped; none
    while the file is not there)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def plot_losses(rows: list[dict], path: str) -> None:
    """Train loss per step and eval loss at its steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
    layouts = [r for r in rows if r["kind"] == "layout"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for before, after in zip(layouts, layouts[1:]):  # a restart onto another world: a line where it resumed
        if after["world_size"] != before["world_size"]:
            ax.axvline(after["step"], color="grey", ls="--", lw=0.8)
            ax.annotate(
                f"{before['world_size']} -> {after['world_size']} ranks",
                (after["step"], 1),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                rotation=90,
                va="top",
                ha="right",
            )
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
