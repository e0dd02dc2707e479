"""Keras torch-backend ops that need a DTensor-aware form.

``slice_update`` with tensor start indices writes through ``index_put_`` with
index grids over every dim; DTensor has no way to do that in place on a value
split along a dim (keras-hub's sampler writes each generated token into a
prompt laid out along the batch axis). Such a value is gathered along the
split axes for the update and laid out again afterwards (the prompt is small;
an all-gather and a local slice per call).

``repeat`` of a DTensor by an integer along one axis (GroupQueryAttention repeats its heads-split
keys and values to the query heads) runs on the local block: each rank's block of the repeated
tensor is its own block repeated, wherever the axis is replicated, or split evenly. DTensor ran it
as four dispatches forward and as many backward per call. Other cases: Keras' own.

``matmul(x, kernel)`` with a 2-D DTensor kernel (a reversible embedding's LM head, ``x @
transpose(table)``; a custom layer's ``ops.matmul(x, self.kernel)``) inside shardimpl's context
runs as a sharded Dense does (`shardimpl.tp_einsum.local_einsum`): on the local blocks, with
Megatron's f on ``x`` where the kernel is split along its output dim (``x``'s gradient
all-reduced once, in backward). DTensor's own matmul left that gradient Partial: it flowed back
through the final norm and every residual add as a partial sum, and each sublayer's output
gradient was all-reduced again where it met a replicated layout (18 all-reduces a step in a
2-block keras-hub Gemma at N = 2 instead of 13). Operands of different or non-float dtypes,
other layouts: Keras' own.

``einsum`` of two DTensors split alike along a letter the output keeps (attention's scores and
weighted values, split by heads) runs on the local blocks (`shardimpl.tp_einsum.local_batched_einsum`).

``argmax`` over the last axis of float logits split along it (a vocabulary-split LM head's, in
keras-hub CausalLMs' default accuracy metric and greedy sampling) is
`shardimpl.vocab_parallel.argmax`: two numbers per position gathered, not the logits.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor, Replicate

from shardimpl.keras.context import is_within

__all__ = ["wrap_slice_update", "wrap_repeat", "wrap_matmul", "wrap_argmax", "wrap_einsum"]


def wrap_slice_update(original):
    @functools.wraps(original)
    def slice_update(inputs, start_indices, updates):
        if not isinstance(inputs, DTensor):
            return original(inputs, start_indices, updates)
        mesh, placements = inputs.device_mesh, tuple(inputs.placements)
        split = [i for i, p in enumerate(placements) if not isinstance(p, Replicate) and mesh.size(i) > 1]
        if not split:
            return original(inputs, start_indices, updates)
        whole = inputs.redistribute(mesh, [Replicate()] * mesh.ndim)
        return original(whole, start_indices, updates).redistribute(mesh, placements)

    return slice_update


def _local_repeat_fits(x: DTensor, axis: int) -> bool:
    """Every placement replicated or a split, and a split of ``axis`` itself an even one."""
    mesh = x.device_mesh
    for i, p in enumerate(x.placements):
        if p.is_partial():
            return False
        if p.is_shard() and p.dim % x.ndim == axis and x.shape[axis] % mesh.size(i):
            return False
    return True


def wrap_repeat(original):
    @functools.wraps(original)
    def repeat(x, repeats, axis=None):
        if not isinstance(x, DTensor) or not isinstance(repeats, int) or isinstance(repeats, bool) or axis is None:
            return original(x, repeats, axis=axis)
        axis = axis + x.ndim if axis < 0 else axis
        if not 0 <= axis < x.ndim or repeats < 0 or not _local_repeat_fits(x, axis):
            return original(x, repeats, axis=axis)
        from shardimpl.local_views import from_local, to_local

        shape = list(x.shape)
        shape[axis] *= repeats
        local = torch.repeat_interleave(to_local(x), repeats, dim=axis)
        return from_local(local, x.device_mesh, x.placements, tuple(shape))

    return repeat


def wrap_matmul(original):
    @functools.wraps(original)
    def matmul(x1, x2):
        if not isinstance(x2, torch.Tensor) and hasattr(type(x2), "value"):  # a Keras variable
            if not _read_as_it_is(x2):
                return original(x1, x2)  # gathered for FSDP: Keras' own matmul, as before
            x2 = x2.value  # ``ops.matmul(x, self.kernel)``: its tensor, as Keras reads it
        if (isinstance(x2, DTensor) and x2.ndim == 2 and isinstance(x1, torch.Tensor) and 2 <= x1.ndim <= 8
                and x1.dtype == x2.dtype and x2.dtype.is_floating_point and is_within()):
            from shardimpl.tp_einsum import dense_equation, local_einsum

            out = local_einsum(dense_equation(x1.ndim), x1, x2)
            if out is not None:
                return out
        return original(x1, x2)

    return matmul


def _read_as_it_is(variable) -> bool:
    """Whether a layer reads ``variable`` as its own DTensor (not gathered along the data axis
    for FSDP, whose gathered blocks DTensor's ops save as re-gather tokens)."""
    raw = getattr(variable, "_value", None)
    if not isinstance(raw, DTensor):
        return False
    from shardimpl.keras.active import current_distribution
    from shardimpl.keras.fsdp import gather_axis

    return gather_axis(raw, current_distribution()) is None


def wrap_argmax(original):
    @functools.wraps(original)
    def argmax(x, axis=None, keepdims=False):
        if (isinstance(x, DTensor) and isinstance(axis, int) and x.dtype.is_floating_point
                and axis in (-1, x.ndim - 1)):
            from shardimpl import vocab_parallel

            if vocab_parallel.vocab_axis(x) is not None:
                out = vocab_parallel.argmax(x, dtype=torch.int32)
                return out.unsqueeze(-1) if keepdims else out
        return original(x, axis=axis, keepdims=keepdims)

    return argmax


def wrap_einsum(original):
    @functools.wraps(original)
    def einsum(subscripts, *operands, **kwargs):
        if (len(operands) == 2 and not kwargs and isinstance(subscripts, str) and is_within()
                and all(isinstance(x, DTensor) and x.dtype.is_floating_point for x in operands)):
            from shardimpl.tp_einsum import local_batched_einsum

            out = local_batched_einsum(subscripts.replace(" ", ""), *operands)
            if out is not None:
                return out
        return original(subscripts, *operands, **kwargs)

    return einsum
