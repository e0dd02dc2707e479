"""Embedding lookup on a sharded table, vocabulary-split tables included.

torch 2.13's DTensor computes a lookup in a vocabulary-split table (weight
``Shard(0)``) as a ``_MaskPartial`` result whose mask is consumed by the first
reduction: when that output feeds two ops (Llama's and Qwen's embeddings feed
a norm and a residual) the second raises a bare AssertionError (pinned by
``tests/test_embedding.py::test_torch_defect_*``). `embedding_lookup` does the
lookup itself and returns a DTensor with ordinary placements:

* on a mesh axis that splits the vocabulary, each rank looks up the ids that
  fall in its rows, zeroes the rest and one all-reduce over that axis sums
  the pieces: the output is Replicate there;
* on an axis that splits the hidden dim, the output is split on its last dim;
* on an axis where the table is replicated, the output follows the ids
  (split along the batch, or replicated).

Backward needs no communication: each rank scatters the output gradient into
its own rows, so the table's gradient comes out laid out like the table
(``Partial`` on axes where the ids, not the table, are split: the
data-parallel sum). Where the ids are split over an axis that also splits the
table (keras-hub's ``("model", "batch")`` embedding, or a vocabulary split
along "batch", on a mesh with batch > 1), the ids are gathered along that axis
instead of the table (a lookup touches a few rows: moving ids costs the ids,
moving the table costs |table| / M) and the output is split like the ids
again (a slice, or for a width split one exchange of the output).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from shardimpl.layout import local_shard_bounds
from shardimpl.mesh import mesh_coordinate

__all__ = ["embedding_lookup"]


def _ids_placements(ids, mesh):
    return tuple(ids.placements) if isinstance(ids, DTensor) else (Replicate(),) * mesh.ndim


def _plan(weight, ids_placements, out_ndim):
    """Per mesh axis: (output placement, gradient placement, whether the axis splits the vocabulary)."""
    mesh = weight.device_mesh
    plan = []
    for axis, (pw, pi) in enumerate(zip(weight.placements, ids_placements)):
        if mesh.size(axis) == 1:
            plan.append((Replicate(), pw, False))
        elif isinstance(pw, Shard) and pw.dim == 0:
            plan.append((Replicate(), Shard(0), True))
        elif isinstance(pw, Shard) and pw.dim == 1:
            plan.append((Shard(out_ndim - 1), Shard(1), False))
        elif isinstance(pw, Replicate):
            plan.append((pi, Partial() if isinstance(pi, Shard) else Replicate(), False))
        else:
            raise ValueError(
                f"embedding_lookup: the table's placement {pw} on mesh axis {axis} is not supported. "
                "Lay the table out with Shard(0), Shard(1) or Replicate() on each mesh axis."
            )
    return plan


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        mesh = weight.device_mesh
        ids_pl = _ids_placements(ids, mesh)
        local_ids = (ids.to_local() if isinstance(ids, DTensor) else ids).to(weight.device)
        out_ndim = ids.ndim + 1
        plan = _plan(weight, ids_pl, out_ndim)
        offsets, sizes = local_shard_bounds(tuple(weight.shape), tuple(mesh.shape), weight.placements,
                                            mesh_coordinate(mesh))
        lo, rows = offsets[0], sizes[0]
        outside = (local_ids < lo) | (local_ids >= lo + rows)
        local_ids = (local_ids - lo).masked_fill(outside, 0)
        table = weight.to_local()
        out = torch.nn.functional.embedding(local_ids, table) if rows else torch.zeros(
            (*local_ids.shape, table.shape[1]), dtype=table.dtype, device=table.device)
        vocab_axes = [axis for axis, (_, _, vocab) in enumerate(plan) if vocab]
        if vocab_axes:
            out = out.masked_fill(outside.unsqueeze(-1), 0)
            for axis in vocab_axes:
                dist.all_reduce(out, group=mesh.get_group(axis))
        # Kept as attributes, not saved tensors: saved-tensor hooks (shardimpl's direct calls)
        # would hand them back as DTensors.
        ctx.local_ids, ctx.outside = local_ids, outside
        ctx.meta = (mesh, tuple(p for p, _, _ in plan), tuple(g for _, g, _ in plan), rows,
                    weight.shape, weight.stride(), bool(vocab_axes))
        shape = torch.Size((*ids.shape, weight.shape[1]))
        return DTensor.from_local(out, mesh, [p for p, _, _ in plan], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    @staticmethod
    def backward(ctx, grad):
        local_ids, outside = ctx.local_ids, ctx.outside
        mesh, out_pl, grad_pl, rows, w_shape, w_stride, masked = ctx.meta
        if isinstance(grad, DTensor):
            if tuple(grad.placements) != out_pl:
                grad = grad.redistribute(mesh, out_pl)
            grad = grad.to_local()
        if masked:
            grad = grad.masked_fill(outside.unsqueeze(-1), 0)
        local = torch.ops.aten.embedding_dense_backward(grad, local_ids, rows, -1, False)
        return None, DTensor.from_local(local, mesh, grad_pl, run_check=False, shape=w_shape, stride=w_stride)


def embedding_lookup(ids, weight: DTensor) -> DTensor:
    """``weight[ids]`` for a DTensor table of shape (vocab, hidden), as a DTensor; differentiable.

    ``ids``: an integer tensor (the same on every rank) or a DTensor on the
    table's mesh (e.g. split along the batch). Negative ids count from the end.
    Communication: one all-reduce of the output per mesh axis that splits the
    vocabulary; along axes that split both the ids and the table, an all-gather
    of the ids and a re-split of the output (its backward, an all-gather of the
    output's gradient). The table never moves. Memory: the output's local
    block (whole along such axes while the lookup runs), and a table gradient
    only as large as the table's shard.
    """
    mesh = weight.device_mesh
    if weight.ndim != 2:
        raise ValueError(f"embedding_lookup needs a (vocab, hidden) table. Received: shape {tuple(weight.shape)}.")
    ids_pl = _ids_placements(ids, mesh)
    if isinstance(ids, DTensor) and ids.device_mesh != mesh:
        raise ValueError("embedding_lookup: the ids and the table must be on the same mesh.")
    # Where the ids and the table are split over the same axis, gather the ids along it (a few
    # integers) rather than the table, and split the output like the ids afterwards.
    both = [i for i, (pw, pi) in enumerate(zip(weight.placements, ids_pl))
            if mesh.size(i) > 1 and isinstance(pi, Shard) and not isinstance(pw, Replicate)]
    if both:
        ids = ids.redistribute(mesh, [Replicate() if i in both else p for i, p in enumerate(ids_pl)])
    if ids.dtype != torch.int64:
        ids = ids.long()
    ids = torch.where(ids < 0, ids + weight.shape[0], ids)
    out = _Lookup.apply(ids, weight)
    if both:
        out = out.redistribute(mesh, [ids_pl[i] if i in both else p for i, p in enumerate(out.placements)])
    return out
