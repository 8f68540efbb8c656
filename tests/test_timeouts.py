"""A rank that never arrives becomes an error that names the timeout, the phase and the collective on the
ranks that wait, after the configured timeout (not the 30-minute default)."""

import time

import pytest
import torch
import torch.distributed as dist

from lasp.distributed.timeouts import CollectiveTimeout, PeerGone, is_timeout, named_timeouts


def case_absent_rank(timeout_s: float) -> tuple[str, float]:
    from lasp import lasp2_linear_attn
    from lasp.parallel import ParallelConfig, init_groups

    groups = init_groups(ParallelConfig(sp=2), timeout_s=timeout_s)
    try:
        if dist.get_rank() == 1:
            return "absent", 0.0
        q = torch.randn(1, 8, 2, 4)
        start = time.monotonic()
        try:
            with named_timeouts("step 7 (forward, backward, gradient sync)", timeout_s, "train.collective_timeout_s"):
                lasp2_linear_attn(q, q, q, group=groups.sp)
        except CollectiveTimeout as e:
            return str(e), time.monotonic() - start
        return "no error", time.monotonic() - start
    finally:
        init_groups(ParallelConfig(sp=2))  # fresh groups, the default timeout, for the next case


def test_a_missing_rank_is_a_named_timeout(dist_pool):
    (msg, seconds), absent = dist_pool(2).run("tests.test_timeouts:case_absent_rank", timeout_s=2)
    assert absent[0] == "absent"
    assert "rank 0: a collective did not complete within train.collective_timeout_s = 2 s" in msg, msg
    assert "during step 7 (forward, backward, gradient sync)" in msg
    assert "lasp2 fingerprint all-gather (call 0) over 2 ranks" in msg
    assert 1.5 < seconds < 20, seconds


def test_other_errors_pass_through():
    with pytest.raises(ValueError, match="plain"):
        with named_timeouts("x", 1, "s"):
            raise ValueError("plain")
    with pytest.raises(RuntimeError, match="^boom$"):
        with named_timeouts("x", 1, "s"):
            raise RuntimeError("boom")
    assert is_timeout(RuntimeError("[gloo] Timed out waiting 3000ms for send operation to complete"))
    assert is_timeout(dist.DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(...)"))


def test_a_peer_that_died_mid_collective_is_named_with_the_phase():
    gone = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:12170"
    with pytest.raises(PeerGone) as e:
        with named_timeouts("step 9 (forward, backward, gradient sync)", 300, "train.collective_timeout_s"):
            raise RuntimeError(gone)
    text = str(e.value)
    assert "a peer closed its connection during step 9 (forward, backward, gradient sync)" in text
    assert "its process or its node died" in text and gone in text
