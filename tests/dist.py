"""CPU test harness for distributed code: a pool of W gloo processes that runs many cases.

Processes are spawned once per world size (each imports torch, which costs seconds) and joined by a
FileStore (no fixed ports). A case is a module-level function named as "module:function"; every rank
calls it with the same keyword arguments and returns a picklable result. A collective timeout makes a
broken case fail instead of hanging; any failure tears the pool down so the next case starts clean.
"""

import datetime
import importlib
import os
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60
CASE_TIMEOUT_S = 240


def _worker(rank: int, world_size: int, store_path: str, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # what torchrun would export; DeepSpeed reads LOCAL_RANK
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        target, kwargs = task
        try:
            module, name = target.split(":")
            results.put((rank, True, getattr(importlib.import_module(module), name)(**kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent verbatim
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """W gloo worker processes; `run` executes one case on all of them and returns the per-rank results."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="lasp-dist-")
        store = os.path.join(self._dir.name, "store")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, world_size, store, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("start-up")

    def _collect(self, what: str) -> list:
        out, errors = {}, []
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while len(out) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"{what}: no answer from every rank (dead ranks: {dead})") from None
                continue
            out[rank] = value
            if not ok:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            self.close()
            raise AssertionError(f"{what} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, target: str, **kwargs) -> list:
        for t in self._tasks:
            t.put((target, kwargs))
        return self._collect(target)

    def close(self) -> None:
        for t, p in zip(self._tasks, self._procs):
            if p.is_alive():
                t.put(None)
        deadline = time.monotonic() + 1  # a clean exit is quick; a rank stuck in a collective is killed
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
        self._dir.cleanup()


def assert_close_rel(got, want, tol: float, what: str = "tensor") -> None:
    """|got - want| <= tol * max|want| elementwise: relative to the tensor's scale, so cancellation in a
    few small entries of a float32 gradient does not fail an exact algorithm."""
    import torch

    scale = max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def profiled_steady_step(run, do):
    """Call run() once without grad (the first call of a new size announces it, lasp.distributed.agree),
    then a steady forward and its backward with `do`, each under the profiler -> (output, fwd, bwd profiles)."""
    import torch

    with torch.no_grad():
        run()
    act = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=act, record_shapes=True) as pf:
        o = run()
    with torch.profiler.profile(activities=act, record_shapes=True) as pb:
        o.backward(do)
    return o, pf, pb


def comm_events(prof) -> list[tuple[str, list]]:
    """(name, input shapes) of every collective / point-to-point event the profiler recorded."""
    from lasp.distributed.events import profiled_ops

    return [(e.name, e.input_shapes) for e in profiled_ops(prof, "gloo:", "nccl:")]


def c10d_ops(prof) -> list[str]:
    """Names of the torch.distributed operations the code asked for (c10d::*), whatever the backend does
    underneath (gloo runs a reduce-scatter as an all-reduce, for instance)."""
    from lasp.distributed.events import profiled_ops

    return [e.name for e in profiled_ops(prof, "c10d::")]
