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
