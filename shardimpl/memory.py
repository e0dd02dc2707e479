"""``shardimpl.memory``: the meters (`shardimpl.meters`) and budgets (`shardimpl.budgets`) in one place.

Kept as the documented entry point; each half lives in its own module.
"""

from shardimpl.budgets import OOM_MARKERS, budget, is_oom, prefer_mmap, warm_thread_pools
from shardimpl.meters import MemoryResult, PeakMeter

__all__ = ["PeakMeter", "MemoryResult", "budget", "is_oom", "OOM_MARKERS", "warm_thread_pools", "prefer_mmap"]
