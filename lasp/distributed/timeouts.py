"""Collective timeouts, and peers that died, as errors that say what happened.

A backend's timeout says little ("Timed out waiting 300000ms for send operation to complete"). Around a
phase of work, `named_timeouts` turns it into a `CollectiveTimeout` that names the setting and its value,
the phase, and the last collective this rank started through lasp.distributed. Every rank that waits
times out, so every such rank reports; the rank that never arrived is the one to look at. A peer that died
mid-collective (gloo: "Connection closed by peer") becomes a `PeerGone` saying the same.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from lasp.distributed.comm import group_rank, last_collective

_SIGNS = ("timed out", "timeout")
_GONE = ("connection closed by peer", "connection reset by peer")  # gloo's words when a peer process died


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within its process group's timeout."""


class PeerGone(RuntimeError):
    """A peer closed its connection in the middle of a collective: its process or its node died."""


def is_timeout(e: BaseException) -> bool:
    """Whether e is a backend's collective timeout (gloo: "Timed out waiting ...", NCCL's watchdog:
    "... Timeout ..."; both are RuntimeErrors, torch's DistBackendError among them)."""
    return (
        isinstance(e, RuntimeError)
        and not isinstance(e, CollectiveTimeout)
        and any(s in str(e).lower() for s in _SIGNS)
    )


@contextmanager
def named_timeouts(phase: str, timeout_s: float, setting: str) -> Iterator[None]:
    """Run the block; a collective timeout inside becomes a CollectiveTimeout naming `setting` (the
    config field) = `timeout_s`, `phase` (what this rank was doing) and the last collective it started."""
    try:
        yield
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (CollectiveTimeout, PeerGone)) and any(s in detail.lower() for s in _GONE):
            raise PeerGone(
                f"rank {group_rank()}: a peer closed its connection during {phase} (its process or its node "
                f"died: look at its log); the last collective this rank started through lasp: "
                f"{last_collective() or 'none'}. Under an elastic launch (NNODES=MIN:MAX) the nodes that "
                f"remain start again from the newest checkpoint. (backend: {detail})"
            ) from e
        if not is_timeout(e):
            raise
        raise CollectiveTimeout(
            f"rank {group_rank()}: a collective did not complete within {setting} = {timeout_s:g} s during "
            f"{phase}; the last collective this rank started through lasp: {last_collective() or 'none'}. "
            f"Another rank is stuck or has died: look at its log first. (backend: {detail})"
        ) from e
