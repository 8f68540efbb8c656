import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. Triton reads this when it is first
# imported (torch.nn.attention imports it), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one fixed tile config per kernel: autotuning every shape the tests use would compile each
# kernel dozens of times per shape (the benchmark autotunes).
os.environ.setdefault("LASP_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

from tests.dist import DistPool  # noqa: E402


@pytest.fixture(scope="session")
def dist_pool():
    """get(W) -> a live DistPool of W gloo processes, started once per world size for the whole run (each
    start costs seconds of torch imports); a pool that a failed case tore down is started again."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive or not pool._procs:
            pool = pools[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
