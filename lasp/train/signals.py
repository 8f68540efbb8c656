"""SIGTERM / SIGINT finish the current step, then every rank stops at the same step.

A signal may reach one rank only (a scheduler's preemption notice, a kill of one process): each rank
records it, and once per step the ranks agree with a one-element MAX all-reduce, so every rank leaves
the loop after the same step instead of some of them waiting in the next collective. A second SIGINT
interrupts at once (KeyboardInterrupt), for a person who does not want to wait.
"""

import signal

import torch
import torch.distributed as dist


class GracefulStop:
    def __init__(self, device: torch.device):
        self.device = device
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self, out_of_time: bool = False) -> bool:
        """True on every rank when any rank received a signal or is `out_of_time` (train.max_minutes; one
        small all-reduce per call)."""
        flag = torch.tensor([2 if self.signal_name is not None else 1 if out_of_time else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal on another rank" if flag.item() == 2 else "train.max_minutes"
        return bool(flag.item())

    def restore(self) -> None:
        """Put the previous handlers back, unless the run is stopping: then a launcher's SIGTERM to the
        remaining ranks (torchrun sends one when the first rank exits) must not kill a rank that is
        still leaving cleanly with its own exit status. SIGTERM is then ignored (SIG_IGN, which outlives
        the interpreter's own shutdown, where Python handlers are dropped)."""
        if self.signal_name is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
