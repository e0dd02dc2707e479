"""Rank-side functions for the launcher tests: each behaves differently by rank."""

import time

import torch
import torch.distributed as dist


def rank_and_world(tag):
    dist.barrier()
    return (tag, dist.get_rank(), dist.get_world_size())


def rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # the others wait for rank 1 and must not hang the call
    return "never"


def rank_one_overallocates(nbytes):
    if dist.get_rank() == 1:
        x = torch.empty(nbytes, dtype=torch.uint8)
        x.fill_(1)
        return int(x.numel())
    return "fine"


def rank_zero_sleeps(seconds):
    if dist.get_rank() == 0:
        time.sleep(seconds)
    return "awake"


def rank_dies_hard():
    import os

    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()
    return "never"


def pid():
    import os

    return os.getpid()


def metered_collectives(reps):
    """``reps`` traced meter blocks, each ending right after an all-gather (the FSDP world's
    pattern); then whether tracing stayed on, and what a default and a traced meter report
    for a bytes buffer.

    A gloo worker thread destroys the finished collective's work just after the block exits and
    takes the GIL to free the input tensor's Python object; stopping tracemalloc then crashed
    the rank on Python < 3.12.9 (CPython gh-128679): 2 of 5 launches of 4 ranks x 300 blocks.
    """
    import tracemalloc

    import shardimpl.meters as meters
    from shardimpl.meters import PeakMeter

    x = torch.ones(1024)
    out = torch.empty(1024 * dist.get_world_size())
    for _ in range(reps):
        with PeakMeter("cpu", trace_python=True):
            dist.all_gather_into_tensor(out, x.clone())
            (out + 1).sum()
    left_on = tracemalloc.is_tracing()
    figures = {}
    for name, trace in (("default", None), ("traced", True)):
        with PeakMeter("cpu", trace_python=trace) as m:
            buf = bytes(8 << 20)  # calloc'd and untouched: only the traced view sees it
            del buf
        figures[name] = m.result().host_traced_peak_bytes
    return {"left_on": left_on, **figures, "safe_here": meters._stopping_tracemalloc_is_safe()}
