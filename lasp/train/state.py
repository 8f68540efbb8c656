"""The train state: everything a resume needs besides the model and optimizer tensors.

The data position is the step itself (the loader is a pure function of (seed, step)), so nothing of the
loader is kept here.
"""

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken (also the index of the next batch the loader reads)."""
    tokens: int = 0
    """Training tokens consumed, over all ranks."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss or gradient norm."""
    skipped_in_a_row: int = 0
    """Consecutive skipped steps up to now (reset by a good step)."""
    first_loss: float | None = None
    """Loss of the first step of this run."""
    last_loss: float = float("nan")
    """Loss of the last step."""
    last_eval_loss: float | None = None
    """Loss of the last evaluation."""
    stopped_by: str | None = None
    """Why the run ended early: a signal name, or None when it ran to train.steps."""
