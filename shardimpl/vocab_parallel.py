"""Cross-entropy over logits split along the vocabulary, without ever making them whole.

A vocabulary-split LM head (``lm_head/kernel`` laid out ``(None, "model")``) leaves the logits
split along their last dim. DTensor's own ``log_softmax`` needs that dim whole, so it
all-gathers the logits on every rank: batch x sequence x vocabulary floats, the step's largest
activation by far (4096 tokens of Llama 3's 128,256-word vocabulary: 2 GiB in float32, and as
much again for their gradient). `cross_entropy` does what Megatron-LM's vocabulary-parallel
cross-entropy does, on each rank's block of the logits:

* forward: the row maximum (one all-reduce MAX of batch x sequence floats), the sum of the
  exponentials (one all-reduce SUM), the target's logit from the rank that holds it (one
  all-reduce SUM); loss = log(sum) + max - target logit;
* backward: softmax - one-hot on the local block, from the exponentials kept by the forward; no
  collective.

Memory per rank: the local block of the exponentials (float32), 1/M of the whole logits'. The
loss per position comes back replicated along the vocabulary's mesh axis and split like the
logits along the others (a batch split along "batch" stays split). Torch only.

`argmax` is the predicted token the same way (keras-hub CausalLMs' default accuracy metric, a
greedy sampler): DTensor's ``argmax`` over the split dim all-gathered the logits whole on every
rank, every step; here each rank's best value and its global index, one all-gather of two
numbers per position.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardimpl.layout import local_shard_bounds
from shardimpl.local_views import from_local, sum_over_groups, to_local
from shardimpl.mesh import mesh_coordinate

__all__ = ["vocab_axis", "cross_entropy", "mean_over_vocabulary", "argmax"]


def vocab_axis(logits) -> int | None:
    """The mesh axis that splits ``logits`` along its last dim, when the fast path applies:
    a DTensor split along its last dim on exactly one mesh axis, and elsewhere replicated or
    split on other dims (never partial). None otherwise (DTensor's own path then)."""
    if not isinstance(logits, DTensor) or logits.dim() < 2:
        return None
    last = logits.dim() - 1
    found = None
    for axis, p in enumerate(logits.placements):
        if isinstance(p, Shard) and p.dim in (last, -1):
            if found is not None:
                return None
            found = axis
        elif not isinstance(p, (Shard, Replicate)):
            return None
    return found


class _LocalCrossEntropy(torch.autograd.Function):
    """Per-position losses from this rank's block of the logits (see the module docstring)."""

    @staticmethod
    def forward(ctx, local_logits, target, vocab_start: int, group):
        x = local_logits.float()
        row_max = x.amax(dim=-1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        x = x - row_max.unsqueeze(-1)
        local_vocab = local_logits.shape[-1]
        here = (target >= vocab_start) & (target < vocab_start + local_vocab)
        index = (target - vocab_start).clamp(0, max(local_vocab - 1, 0)).unsqueeze(-1)
        shifted = x.gather(-1, index).squeeze(-1) if local_vocab else torch.zeros_like(row_max)
        target_logit = torch.where(here, shifted, torch.zeros_like(shifted))
        dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
        exp = x.exp_()  # in place: x is this function's own (shifted) copy
        total = exp.sum(dim=-1)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(exp, total, index, here)
        ctx.logits_dtype = local_logits.dtype
        return total.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        exp, total, index, here = ctx.saved_tensors
        softmax = exp.div_(total.unsqueeze(-1))  # the forward's buffer: used once
        if softmax.shape[-1]:
            softmax.scatter_add_(-1, index, -here.to(softmax.dtype).unsqueeze(-1))
        return softmax.mul_(grad.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None


def cross_entropy(logits: DTensor, target) -> DTensor:
    """Per-position cross-entropy of ``logits`` (a DTensor split along its last dim, see
    `vocab_axis`) against integer ``target`` ids (shaped like ``logits`` without its last dim;
    a tensor, or a DTensor laid out like the logits' other dims).

    Collectives: three all-reduces of one float per position, in the vocabulary axis' group,
    forward; none backward. Memory: float32 exponentials of the local block, kept for backward.
    Returns a DTensor replicated along the vocabulary axis.
    """
    axis = vocab_axis(logits)
    if axis is None:
        raise ValueError("cross_entropy needs logits split along their last dim on one mesh axis. "
                         f"Received: placements={getattr(logits, 'placements', None)}; use torch's "
                         "cross_entropy for other layouts.")
    mesh = logits.device_mesh
    out_placements = _per_position_placements(logits, axis)
    local_target = _local_target(target, logits, out_placements)
    offsets, _ = local_shard_bounds(tuple(logits.shape), tuple(mesh.shape), tuple(logits.placements),
                                    mesh_coordinate(mesh))
    group = mesh.get_group(axis)
    local = _LocalCrossEntropy.apply(logits.to_local(), local_target.long(), int(offsets[-1]), group)
    return DTensor.from_local(local, mesh, out_placements, run_check=False,
                              shape=tuple(logits.shape[:-1]), stride=_contiguous_stride(logits.shape[:-1]))


def mean_over_vocabulary(elementwise, logits: DTensor, target) -> DTensor:
    """``mean(elementwise(target, logits), axis=-1)`` for ``logits`` split along their last dim
    (`vocab_axis`) and a ``target`` shaped like them (a tensor, or a DTensor): Keras' mean
    squared and absolute errors without DTensor's dispatches or its gathering.

    ``elementwise`` takes the local blocks of the target and the logits and returns values of
    the same shape. Collectives: one all-reduce of one float per position forward (the sum of
    each rank's block), none backward. Memory: the local block's values. Returns a DTensor laid
    out as `cross_entropy`'s: replicated along the vocabulary axis.
    """
    axis = vocab_axis(logits)
    if axis is None:
        raise ValueError("mean_over_vocabulary needs logits split along their last dim on one mesh axis. "
                         f"Received: placements={getattr(logits, 'placements', None)}.")
    mesh = logits.device_mesh
    placements = tuple(logits.placements)
    local_logits = to_local(logits)
    local_target = _local_target(target, logits, placements).to(local_logits.dtype)
    summed = sum_over_groups(elementwise(local_target, local_logits).sum(dim=-1), [mesh.get_group(axis)])
    return from_local(summed / logits.shape[-1], mesh, _per_position_placements(logits, axis),
                      tuple(logits.shape[:-1]))


def argmax(logits: DTensor, dtype: torch.dtype = torch.int64) -> DTensor:
    """``torch.argmax(logits, dim=-1)`` for float ``logits`` split along their last dim
    (`vocab_axis`), as ``dtype``: the first index of the largest value (NaN counting as the
    largest, as torch's), never gathering the logits.

    Each rank takes its block's argmax and that value; one all-gather of (value, global index)
    per position in the vocabulary axis' group, as float64 (a float32 value and an index below
    2**53 are exact there); torch's argmax over the ranks' values picks the first rank holding
    the largest, which is the first index overall (blocks are in rank order). A rank with an
    empty block (uneven split) offers -inf. Returns a DTensor laid out as `cross_entropy`'s
    result: replicated along the vocabulary axis. Memory: two numbers per position per rank.
    """
    axis = vocab_axis(logits)
    if axis is None or not logits.dtype.is_floating_point:
        raise ValueError("argmax needs float logits split along their last dim on one mesh axis. Received: "
                         f"dtype={logits.dtype}, placements={getattr(logits, 'placements', None)}; use "
                         "torch.argmax for other layouts.")
    mesh = logits.device_mesh
    local = logits.to_local().detach()  # no gradient: an index
    offsets, _ = local_shard_bounds(tuple(logits.shape), tuple(mesh.shape), tuple(logits.placements),
                                    mesh_coordinate(mesh))
    if local.shape[-1]:
        index = local.argmax(dim=-1, keepdim=True)
        mine = torch.cat([local.gather(-1, index).double(), (index + int(offsets[-1])).double()], dim=-1)
    else:
        mine = torch.full((*local.shape[:-1], 2), float("-inf"), dtype=torch.float64, device=local.device)
        mine[..., 1] = 0
    group = mesh.get_group(axis)
    ranks = dist.get_world_size(group)
    every = torch.empty((ranks * mine.numel() // 2, 2), dtype=mine.dtype, device=mine.device)
    dist.all_gather_single(every, mine.reshape(-1, 2).contiguous(), group=group)
    every = every.view(ranks, *mine.shape)
    best = every[..., 0].argmax(dim=0, keepdim=True)
    local_out = every[..., 1].gather(0, best).squeeze(0).to(dtype)
    return DTensor.from_local(local_out, mesh, _per_position_placements(logits, axis), run_check=False,
                              shape=tuple(logits.shape[:-1]), stride=_contiguous_stride(logits.shape[:-1]))


def _per_position_placements(logits, axis: int) -> tuple:
    """The layout of a value per position of ``logits`` (a loss, a predicted index): replicated
    along the vocabulary's mesh axis ``axis``, split like the logits along the others."""
    return tuple(Replicate() if i == axis else p for i, p in enumerate(logits.placements))


def _local_target(target, logits, placements):
    """This rank's block of ``target``, laid out as the per-position losses (``placements``)."""
    if isinstance(target, DTensor):
        return target.redistribute(logits.device_mesh, placements).to_local()
    target = torch.as_tensor(target, device=logits.to_local().device)
    mesh = logits.device_mesh
    offsets, sizes = local_shard_bounds(tuple(target.shape), tuple(mesh.shape), placements, mesh_coordinate(mesh))
    for dim, (o, s) in enumerate(zip(offsets, sizes)):
        if s != target.shape[dim]:
            target = target.narrow(dim, o, s)
    return target


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, out = 1, []
    for size in reversed(tuple(shape)):
        out.append(stride)
        stride *= int(size)
    return tuple(reversed(out))
