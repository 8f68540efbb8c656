"""`simulate`: one process plays the W ranks of a step in turn, each with its real local sizes.

Each rank's turn runs the method's own code on a process group of W ranks whose collectives are local
copies (`LocalCopies`, below): an all-gather fills every rank's slot with this rank's tensor, an all-to-all
and a reduce-scatter copy this rank's own buffer, a receive gives zeros, and nothing waits. What is timed
is that rank's compute, with exactly the shapes of the distributed run (a test compares them) and
realistic values (no uninitialised buffers, whose infinities slow the arithmetic down). The profiler still
counts the messages; the cost model prices them. A machine with one GPU can so measure the per-rank
compute of any W.

On a CPU, W processes of a real run share the cores, caches and memory bandwidth; `--concurrent` runs the W
simulated ranks in W processes at the same time (`ConcurrentSimulator`), so their compute shares the
machine as it does in the run. One rank at a time is the right mode on a GPU (one device per rank).
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

from lasp.bench.sp.methods import Case, measure
from lasp.sp.cost import Message

BACKEND = "lasp_local_copies"
_log: list[Message] | None = None


@contextlib.contextmanager
def counted() -> Iterator[list[Message]]:
    """The collectives a LocalCopies group runs inside the block, as the cost model's messages (the profiler
    does not see the collectives of a process group written in Python)."""
    global _log
    outer, _log = _log, []
    try:
        yield _log
    finally:
        _log = outer


def _count(kind: str, t) -> None:
    if _log is not None:
        _log.append(Message(kind, t.numel() * t.element_size()))


def _done(result):
    f = Future()
    f.set_result(result)
    return _create_work_from_future(f)


class LocalCopies(dist.ProcessGroup):
    """A process group of `world_size` ranks in which this rank is alone: collectives are local copies."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self._rank, self._size = rank, world_size

    def getBackendName(self) -> str:
        return BACKEND

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def barrier(self, opts=None):
        return _done(None)

    def all_gather_single(self, out, inp, opts=None):
        _count("all_gather", out)
        out.view(self._size, *inp.shape).copy_(inp.unsqueeze(0))
        return _done(out)

    def reduce_scatter_single(self, out, inp, opts=None):
        _count("reduce_scatter", inp)
        out.copy_(inp.view(self._size, *out.shape)[self._rank])
        return _done(out)

    def alltoall_base(self, out, inp, out_split, in_split, opts=None):
        _count("all_to_all", inp)
        out.copy_(inp)
        return _done(out)

    def send(self, tensors, dst, tag):
        return _done(None)

    def recv(self, tensors, src, tag):
        for t in tensors:
            t.zero_()
        return _done(tensors)

    _allgather_base = all_gather_single
    _reduce_scatter_base = reduce_scatter_single


if BACKEND not in dist.Backend.backend_list:
    dist.Backend.register_backend(
        BACKEND, lambda store, rank, world_size, timeout: LocalCopies(rank, world_size), devices=["cpu", "cuda"]
    )


def simulate(
    case: Case, reps: int, ranks: list[int] | None = None, check_ranks: bool = True, barrier=None
) -> list[dict]:
    """Rows of `measure` for each rank of `case` (all of them, or `ranks`), each alone in its group, one
    after the other (`ConcurrentSimulator` runs them at the same time)."""
    if dist.is_initialized():
        raise RuntimeError("simulate needs a process without a process group: it makes one per rank")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as each process of the sweep: one thread per rank
    rows = []
    for rank in range(case.W) if ranks is None else ranks:
        dist.init_process_group(BACKEND, store=dist.HashStore(), rank=rank, world_size=case.W)
        try:
            row = measure(case, None, rank, reps, check_ranks=check_ranks, barrier=barrier, count=counted)
            rows.append({**row, "simulated": "concurrent" if barrier else "in turn"})
        finally:
            dist.destroy_process_group()
    return rows


def _worker(index: int, tasks, results, barrier) -> None:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while (task := tasks.get()) is not None:
        case, reps, check_ranks = task
        if index < case.W:
            try:
                results.put((index, simulate(case, reps, [index], check_ranks, barrier=barrier.wait)[0]))
            except Exception as e:  # noqa: BLE001 - reported to the parent
                results.put((index, e))
        else:
            for _ in range(reps + 1):  # the participants' barriers: one per timed pass and the warm-up
                barrier.wait()
            results.put((index, None))


class ConcurrentSimulator:
    """P worker processes that simulate the ranks of a case at the same time, one rank each (W <= P): the
    compute then shares the machine as the W processes of a real run do (cores, caches, memory)."""

    def __init__(self, processes: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(processes)]
        self._results = ctx.Queue()
        self._barrier = ctx.Barrier(processes)
        self._procs = [
            ctx.Process(target=_worker, args=(i, self._tasks[i], self._results, self._barrier), daemon=True)
            for i in range(processes)
        ]
        for p in self._procs:
            p.start()

    def run(self, case: Case, reps: int, check_ranks: bool) -> list[dict]:
        if case.W > len(self._procs):
            raise ValueError(f"{case.W} ranks need {case.W} simulator processes, there are {len(self._procs)}")
        for q in self._tasks:
            q.put((case, reps, check_ranks))
        got = dict(self._results.get(timeout=3600) for _ in self._procs)
        errors = [v for v in got.values() if isinstance(v, Exception)]
        if errors:
            raise errors[0]
        return [got[r] for r in range(case.W)]

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
