"""Gather: rebuild the full tensor of a sharded variable when it is really needed.

Saving and checkpoint export need full tensors; training never does.
`gather_variable` is a gather, not one all-gather collective: it moves one
shard at a time (a broadcast per shard to every rank, or point-to-point to
one ``dst``), so besides the output a rank holds at most one shard-sized
receive buffer on the communication device, and nothing of full size ever
lands on an accelerator when ``device="cpu"``. `all_gather_variable` is the
same function under its first public name.
"""

from __future__ import annotations

import logging
import math
from itertools import product

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from shardimpl.layout import local_shard_bounds, shard_slices

__all__ = ["gather_variable", "all_gather_variable", "shard_owners"]

logger = logging.getLogger("shardimpl")


def shard_owners(shape, mesh_shape, placements, ranks):
    """One (owner rank, offsets, sizes) per distinct non-empty shard, in mesh order.

    Replicated mesh axes make several ranks hold the same shard; the first in
    mesh order is its owner. Pure.
    """
    seen, owners = set(), []
    for coord in product(*(range(int(n)) for n in mesh_shape)):
        offsets, sizes = local_shard_bounds(shape, mesh_shape, placements, coord)
        if math.prod(sizes) == 0 or (offsets, sizes) in seen:
            continue
        seen.add((offsets, sizes))
        owners.append((int(ranks[coord]), offsets, sizes))
    return owners


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view, so every dtype (bool, bfloat16, complex) travels over gloo and NCCL."""
    return t.reshape(-1).view(torch.uint8)


def gather_variable(x, *, device="cpu", dst=None, name=None):
    """Return the full tensor of ``x`` on ``device`` (every rank, or only rank ``dst``).

    Args:
        x: a DTensor from `distribute_variable` (a plain tensor is returned on
            ``device`` as is).
        device: where the full tensor is allocated (default: host memory).
        dst: None, every rank receives the full tensor; an int, only that
            global rank does and the others return None without allocating it.

    Communication: with ``dst=None`` one broadcast per distinct shard over the
    world group; with ``dst`` one send/recv per shard owner to ``dst``.
    Memory: the full tensor on ``device`` (on the receiving ranks only), plus
    one shard-sized buffer on the shard's device while receiving.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not isinstance(x, DTensor):
        return None if dst is not None and dst != rank else x.detach().to(device)
    local = x.to_local().detach()
    shape, dtype = tuple(x.shape), x.dtype
    receiver = dst is None or dst == rank
    out = torch.empty(shape, dtype=dtype, device=device) if receiver else None
    mesh = x.device_mesh
    if all(isinstance(p, Replicate) for p in x.placements):
        if receiver:
            out.copy_(local)
        _log(name, shape, dtype, device, dst, receiver)
        return out
    owners = shard_owners(shape, tuple(mesh.shape), x.placements, mesh.mesh)
    local = local.contiguous()
    for src, offsets, sizes in owners:
        target = out[shard_slices(offsets, sizes)] if receiver else None
        if dst is None:
            buf = local if src == rank else torch.empty(sizes, dtype=dtype, device=local.device)
            dist.broadcast(_as_bytes(buf), src=src)
            target.copy_(buf)
        elif src == dst == rank:
            target.copy_(local)
        elif src == rank:
            dist.send(_as_bytes(local), dst=dst)
        elif rank == dst:
            buf = torch.empty(sizes, dtype=dtype, device=local.device)
            dist.recv(_as_bytes(buf), src=src)
            target.copy_(buf)
            del buf
    _log(name, shape, dtype, device, dst, receiver)
    return out


#: The first public name of `gather_variable` (kept: it gathers with broadcasts, not one all-gather).
all_gather_variable = gather_variable


def _log(name, shape, dtype, device, dst, receiver):
    if logger.isEnabledFor(logging.DEBUG):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        logger.debug(
            "all_gather_variable name=%s full_shape=%s bytes=%d device=%s dst=%s received=%s",
            name, shape, nbytes, device, "all" if dst is None else dst, receiver,
        )
