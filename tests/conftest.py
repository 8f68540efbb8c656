import pytest

from tests.dist import DistPool


@pytest.fixture(scope="module")
def dist_pool():
    """get(W) -> a live DistPool of W gloo processes, started once per test module (so processes that
    imported megatron-core or DeepSpeed do not linger beside the next module's)."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive or not pool._procs:
            pool = pools[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
