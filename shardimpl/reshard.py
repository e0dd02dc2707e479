"""Shard(a) -> Shard(b) on a 1-D mesh without ever holding the full tensor.

DTensor turns that redistribution into an all-to-all, and gloo has none: it
falls back to an all-gather of the *whole* tensor on every rank. For a weight
gradient that is the full weight per rank. Here each rank sends every peer the
block that peer needs (its rows, the peer's columns) and receives its own
blocks, point to point: besides input and output, a rank holds its outgoing
blocks (one shard in total) and nothing larger.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from shardimpl.layout import local_shard_bounds
from shardimpl.mesh import mesh_ranks

__all__ = ["can_reshard_p2p", "reshard_p2p"]


def can_reshard_p2p(x, placements) -> bool:
    """True for a 1-D mesh DTensor going from one Shard dim to another."""
    return (
        isinstance(x, DTensor)
        and x.device_mesh.ndim == 1
        and len(placements) == 1
        and isinstance(x.placements[0], Shard)
        and isinstance(placements[0], Shard)
        and x.placements[0].dim != placements[0].dim
    )


def _bounds(shape, placement, n, r):
    return local_shard_bounds(shape, (n,), (placement,), (r,))


def reshard_p2p(x: DTensor, placements) -> DTensor:
    """``x`` laid out as ``placements`` (Shard(b)), moved block by block with send/recv.

    Communication: one send and one receive per pair of ranks (batched).
    Memory: the output shard plus this rank's outgoing blocks (one shard).
    """
    mesh = x.device_mesh
    ranks = mesh_ranks(mesh)
    n, me = len(ranks), mesh.get_coordinate()[0]
    shape = tuple(x.shape)
    src, dst = x.placements[0], placements[0]
    local = x.to_local()
    my_src_off, _ = _bounds(shape, src, n, me)
    my_dst_off, my_dst_size = _bounds(shape, dst, n, me)
    out = torch.empty(my_dst_size, dtype=local.dtype, device=local.device)
    ops, keep = [], []
    for peer in range(n):
        peer_src_off, peer_src_size = _bounds(shape, src, n, peer)
        peer_dst_off, peer_dst_size = _bounds(shape, dst, n, peer)
        # What I hold of the peer's output block: my source rows x the peer's target columns.
        send = [slice(0, s) for s in local.shape]
        send[dst.dim] = slice(peer_dst_off[dst.dim] - my_src_off[dst.dim],
                              peer_dst_off[dst.dim] - my_src_off[dst.dim] + peer_dst_size[dst.dim])
        # What the peer holds of mine: its source rows x my target columns.
        recv = [slice(0, s) for s in my_dst_size]
        recv[src.dim] = slice(peer_src_off[src.dim] - my_dst_off[src.dim],
                              peer_src_off[src.dim] - my_dst_off[src.dim] + peer_src_size[src.dim])
        block_out = local[tuple(send)]
        target = out[tuple(recv)]
        if peer == me:
            target.copy_(block_out)
            continue
        if block_out.numel():
            block_out = block_out.contiguous()
            keep.append(block_out)
            ops.append(dist.P2POp(dist.isend, block_out, ranks[peer]))
        if target.numel():
            buf = torch.empty(target.shape, dtype=out.dtype, device=out.device)
            keep.append((buf, target))
            ops.append(dist.P2POp(dist.irecv, buf, ranks[peer]))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for item in keep:
        if isinstance(item, tuple):
            item[1].copy_(item[0])
    return DTensor.from_local(out, mesh, tuple(placements), run_check=False,
                              shape=x.shape, stride=x.stride())
