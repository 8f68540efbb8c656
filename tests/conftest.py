import pytest

from tests.dist import DistPool

_pools: dict[int, DistPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """get(W) -> a live DistPool of W gloo processes, started once and shared by all tests."""

    def get(world_size: int) -> DistPool:
        pool = _pools.get(world_size)
        if pool is None or not pool.alive or not pool._procs:
            pool = _pools[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in _pools.values():
        pool.close()
