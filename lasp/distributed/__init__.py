"""Process groups and the collectives the SP algorithms use. Nothing here knows about attention."""

from lasp.distributed.autograd import all_gather_stack, all_to_all_stack, ring_shift
from lasp.distributed.comm import all_gather_async, group_rank, group_size, is_distributed, recv, send

__all__ = [
    "all_gather_async",
    "all_gather_stack",
    "all_to_all_stack",
    "group_rank",
    "group_size",
    "is_distributed",
    "recv",
    "ring_shift",
    "send",
]
