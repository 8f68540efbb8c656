"""Process groups and the collectives the SP algorithms use. Nothing here knows about attention."""

from lasp.distributed.comm import all_gather_async, group_rank, group_size, is_distributed, recv, send

__all__ = ["all_gather_async", "group_rank", "group_size", "is_distributed", "recv", "send"]
