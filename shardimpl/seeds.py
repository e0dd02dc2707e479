"""Seeds that every rank agrees on, without a collective per variable.

An unseeded Keras initializer draws its seed from Python's `random` in each
process, so two ranks would initialize the two halves of one kernel from
different streams. shardimpl instead derives each unseeded variable's seed from
a *base seed* that the ranks agree on once (rank 0's draw, broadcast when the
first mesh is built) and a creation counter (ranks create variables in the same
order). `keras.utils.set_random_seed` makes rank 0's draw reproducible.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

__all__ = ["agree_base_seed", "next_seed", "mix_seed"]

_MASK = (1 << 63) - 1
_state = {"base": None, "counter": 0}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer chained over ``parts``)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


def agree_base_seed(device_type: str = "cpu") -> int:
    """Make every rank hold rank 0's base seed (one 8-byte broadcast, once per process).

    Each rank draws from Python's `random` (keeping the ranks' `random` streams
    in step); rank 0's value wins. Without a process group the local draw is used.
    """
    if _state["base"] is not None:
        return _state["base"]
    draw = random.getrandbits(62)
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if device_type == "cuda" and dist.get_backend() == "nccl" else "cpu"
        if device == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([draw], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        draw = int(t.item())
    _state["base"] = draw
    return draw


def next_seed() -> int:
    """The seed of the next unseeded variable: mix(base seed, creation counter)."""
    base = agree_base_seed()
    _state["counter"] += 1
    return mix_seed(base, _state["counter"])


def reset_seeds(base: int | None = None) -> None:
    """Forget the agreed base seed and counter (tests; a fresh model build)."""
    _state["base"] = base
    _state["counter"] = 0
