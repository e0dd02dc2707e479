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
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardimpl.agree import agree, checksum, describe
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


def _check_device(device, where) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{where}: device must name a torch device such as 'cpu' or 'cuda:0'. "
            f"Received: device={device!r} ({exc})."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{where}: device={device!r} but this torch has no usable CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
            "Use device='cpu' (the default: the full tensor in host memory)."
        )
    return dev


def _check_dst(dst, world, where) -> None:
    if dst is None:
        return
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world:
        raise ValueError(
            f"{where}: dst must be None (every rank receives the full tensor) or a global "
            f"rank 0 <= dst < {world} (the world size). Received: dst={dst!r}. "
            "Pass dst=0 to gather on rank 0 only."
        )


def _plain_placements(placements) -> tuple:
    """Placements gathered shard by shard: Shard(d) and Replicate() as they are; any other
    (Partial, _StridedShard, ...) made Replicate on its mesh axis first, by DTensor."""
    return tuple(p if type(p) in (Shard, Replicate) else Replicate() for p in placements)


def gather_variable(x, *, device="cpu", dst=None, name=None):
    """Return the full tensor of ``x`` on ``device`` (every rank, or only rank ``dst``).

    Args:
        x: a DTensor (from `distribute_variable` or DTensor ops: ``Shard``,
            ``Replicate``, ``Partial`` and ``_StridedShard`` placements), or a
            plain tensor, returned on ``device`` as is.
        device: where the full tensor is allocated (default: host memory).
        dst: None, every rank receives the full tensor; an int, only that
            global rank does and the others return None without allocating it.

    Every rank must call it with the same ``x`` (the same variable), ``dst``
    and in the same order. Arguments are checked on every rank and the ranks
    agree (`shardimpl.agree`) before any data moves: a bad ``dst``/``device``
    or a failed allocation on one rank raises on every rank, nobody blocks.

    Communication: one all-reduce of 72 bytes (the agreement); then, for a
    mesh axis with a ``Partial`` or ``_StridedShard`` placement, DTensor's
    redistribute to ``Replicate`` over that axis (an all-reduce or all-gather);
    then with ``dst=None`` one broadcast per distinct shard over the world
    group, with ``dst`` one send/recv per shard owner to ``dst``. A fully
    replicated DTensor needs no communication and skips the agreement.
    Memory: the full tensor on ``device`` (on the receiving ranks only), plus
    one receive buffer of the largest shard on the shard's device; a
    ``Partial``/``_StridedShard`` axis adds its full extent on every rank of it.
    """
    where = f"gather_variable({name!r})" if name else "gather_variable"
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not isinstance(x, DTensor):
        dev = _check_device(device, where)
        _check_dst(dst, world, where)
        return None if dst is not None and dst != rank else x.detach().to(dev)
    shape, dtype, mesh = tuple(x.shape), x.dtype, x.device_mesh
    placements = _plain_placements(x.placements)
    if all(isinstance(p, Replicate) for p in x.placements):
        # Whole on every rank already: a local copy, no communication, nothing to agree on.
        dev = _check_device(device, where)
        _check_dst(dst, world, where)
        out = x.to_local().detach().to(dev, copy=True) if dst is None or dst == rank else None
        _log(name, shape, dtype, device, dst, out is not None)
        return out
    whole = all(isinstance(p, Replicate) for p in placements)  # Partial/_StridedShard only
    owners = [] if whole else shard_owners(shape, tuple(mesh.shape), placements, mesh.mesh)
    receiver = dst is None or dst == rank
    problem = error = out = buf = None
    try:
        dev = _check_device(device, where)
        _check_dst(dst, world, where)
        out = torch.empty(shape, dtype=dtype, device=dev) if receiver else None
        itemsize = torch.empty((), dtype=dtype).element_size()
        needs_buffer = any(src != rank for src, _, _ in owners) and (dst is None or dst == rank)
        if needs_buffer:  # one receive buffer, reused for every shard
            largest = max(math.prod(sizes) for _, _, sizes in owners) * itemsize
            buf = torch.empty(largest, dtype=torch.uint8, device=x.to_local().device)
    except Exception as exc:
        problem, error = describe(exc), exc
    agree(problem, where=where, error=error,
          values=(-1 if dst is None else dst, checksum(shape, str(dtype), tuple(mesh.shape), placements)),
          names=("dst", "the variable's (shape, dtype, mesh, placements) checksum"))
    if placements != tuple(x.placements):
        x = x.redistribute(mesh, placements)
    local = x.to_local().detach().contiguous()
    if whole and receiver:
        out.copy_(local)
    for src, offsets, sizes in owners:
        target = out[shard_slices(offsets, sizes)] if receiver else None
        if src == rank:
            if dst is None and world > 1:
                dist.broadcast(_as_bytes(local), src=src)
            if receiver:
                target.copy_(local)
            elif src != dst:
                dist.send(_as_bytes(local), dst=dst)
            continue
        if dst is not None and rank != dst:
            continue
        piece = buf[: math.prod(sizes) * itemsize].view(dtype).view(sizes)
        if dst is None:
            dist.broadcast(_as_bytes(piece), src=src)
        else:
            dist.recv(_as_bytes(piece), src=src)
        target.copy_(piece)
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
