"""``to_local`` and ``from_local`` for the local-math paths, with their layouts built once.

shardimpl's sharded layers (`shardimpl.tp_einsum`, attention, RMS norm, the vocabulary-parallel
embedding and loss) step out of DTensor to run torch's kernels on the local blocks and step back
in. `DTensor.to_local` / `DTensor.from_local` do that, but each call rebuilds the layout
(`DTensorSpec`: placements, shard order, global shape and stride, its hash) in Python, and
``to_local``'s backward builds it twice through a nested ``from_local``: 60 to 135 us a call
measured on this machine's CPU (a 64 MiB transformer step at N = 2 makes about 90 and 60 of
them). Here the layouts are cached per (mesh, placements, shape, stride, dtype), so a call
costs one autograd node and a dictionary lookup.

Semantics are DTensor's own (its ``_ToTorchTensor`` / ``_FromTorchTensor``):

* ``to_local(x, grad_placements)``: a view of ``x``'s local tensor; in backward, the local
  gradient becomes a DTensor laid out as ``grad_placements`` (default: ``x``'s, Partial
  read as Replicate) with ``x``'s global shape; its stride is the gradient's own, made global.
* ``from_local(local, mesh, placements, shape, stride)``: a DTensor viewing ``local``; in
  backward, the DTensor gradient is redistributed to ``placements`` (Partial read as
  Replicate) where it is laid out otherwise, and its local tensor is the gradient.

No collective except that backward redistribution (which DTensor's ``from_local`` does too).

A DTensor made by ``from_local`` remembers its local tensor: ``to_local`` of it with the default
gradient layout hands back (a view of) that tensor itself, with no autograd node of its own,
as long as the DTensor was not changed in place since (its ``grad_fn`` is the one ``from_local``
gave it). Gradients are the same either way (the round trip is the identity on the local
gradient); a chain of sharded layers then steps out of and back into DTensor once per layer
instead of twice.

Inside `parameter_leaves()` (Keras' own train step: `shardimpl.keras.steps`), a trainable
parameter (a leaf DTensor that requires grad) whose gradient keeps its own layout
(the default, with no Partial placement) is not stepped out of per use: ``to_local`` hands back
one plain leaf per parameter that views its local tensor (same memory, same version counter).
Autograd accumulates the local gradient there with no Python in between; a hook run right after
moves it, wrapped in the parameter's layout, into the parameter's ``grad`` (summed with one
already there), where Keras' trainer and optimizers read it. Per parameter and step this saves
a ``_ToLocal`` node forward and backward, the DTensor ``detach`` of ``AccumulateGrad`` and the
parameter's layout hook. Only where the gradients are read from ``.grad`` after ``backward()``,
as Keras' trainer does: ``torch.autograd.grad`` with respect to the parameter would not see its
local uses, so direct calls and users' own steps keep the ``_ToLocal`` node.

``sum_partial(x)``: a Partial(sum) DTensor summed over its partial axes (Megatron's g), as
``x.redistribute`` to Replicate there, with one ``torch.distributed.all_reduce`` per partial axis
on a copy of the local tensor; its backward is the identity. DTensor's own redistribute goes
through its functional collectives' custom-op and autograd wrappers: about 0.7 ms more per
call measured on this machine (a 64 MiB mlp step at N = 2 makes two).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._redistribute import redistribute_local_tensor
from torch.distributed.tensor._utils import compute_global_tensor_info

__all__ = ["to_local", "from_local", "from_spec", "layout_of", "sum_partial", "sum_over_groups", "contiguous_stride",
           "parameter_leaves"]

_SPECS: dict = {}
_MAX_SPECS = 4096  # distinct layouts of one program are a few hundred; a bound against leaks


def contiguous_stride(shape) -> tuple:
    """The row-major stride of ``shape``."""
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _spec(mesh, placements: tuple, shape: tuple, stride: tuple, dtype) -> DTensorSpec:
    """The layout, built once per key. Shared: each DTensor made with it gets its own shallow
    copy, as DTensor's own ``to_local`` backward does, so that sharding propagation never edits
    a shared one."""
    key = (mesh, placements, shape, stride, dtype)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= _MAX_SPECS:
            _SPECS.clear()
        spec = _SPECS[key] = DTensorSpec(mesh, placements, tensor_meta=TensorMeta(torch.Size(shape), stride, dtype))
    return spec


def _for_grad(placements) -> tuple:
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def _plain_gradient(grad):
    """A local tensor's gradient as a plain tensor. Where the local tensor met a DTensor downstream
    (a loss scaled by a replicated LossScaleOptimizer variable), DTensor took it as replicated, so
    the gradient is a DTensor shaped like the local tensor: summed where partial, its local tensor."""
    if isinstance(grad, DTensor):
        return grad.redistribute(grad.device_mesh, [Replicate()] * grad.device_mesh.ndim).to_local()
    return grad


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, placements, grad_placements):
        ctx.meta = (x.device_mesh, placements, grad_placements, tuple(x.shape), x.dtype)
        ctx.set_materialize_grads(False)
        local = x._local_tensor
        return local.view_as(local)  # a fresh tensor object: autograd's metadata goes on it

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        mesh, placements, grad_placements, shape, dtype = ctx.meta
        grad = _plain_gradient(grad)
        if grad.is_contiguous():
            stride = contiguous_stride(shape)
        else:  # e.g. a transposed einsum gradient: its own stride, made global (DTensor's rule)
            stride = tuple(compute_global_tensor_info(grad, mesh, placements)[1])
        spec = copy.copy(_spec(mesh, grad_placements, shape, stride, grad.dtype))
        return DTensor(grad, spec, requires_grad=grad.requires_grad), None, None


class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, spec):
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return DTensor(local.view_as(local), spec, requires_grad=local.requires_grad)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        wanted = _for_grad(ctx.spec.placements)
        if tuple(grad.placements) != wanted:
            target = DTensorSpec(ctx.spec.mesh, wanted, tensor_meta=grad._spec.tensor_meta)
            return redistribute_local_tensor(grad._local_tensor, grad._spec, target), None
        local = grad._local_tensor
        return local.view_as(local), None


_leaves = threading.local()


@contextlib.contextmanager
def parameter_leaves():
    """In this thread, for the block: parameters' local uses go through their local leaves (module
    docstring); their gradients are then read from ``.grad`` after ``backward()``."""
    _leaves.depth = getattr(_leaves, "depth", 0) + 1
    try:
        yield
    finally:
        _leaves.depth -= 1


def to_local(x: DTensor, grad_placements=None) -> torch.Tensor:
    """``x.to_local(grad_placements=...)`` with the gradient's layout built once (module docstring)."""
    if not torch.is_grad_enabled():
        return x._local_tensor
    placements = tuple(x.placements)
    default = _for_grad(placements)
    grads = default if grad_placements is None else tuple(grad_placements)
    if grads == default:
        if x.is_leaf and x.requires_grad and grads == placements and getattr(_leaves, "depth", 0):
            return _leaf_of(x)
        made = x.__dict__.get("_shardimpl_made")
        if made is not None and made[1] is x.grad_fn:
            return made[0].view_as(made[0])
    return _ToLocal.apply(x, placements, grads)


def _leaf_of(param: DTensor) -> torch.Tensor:
    """The plain leaf standing for a trainable DTensor's local tensor (module docstring): it views
    the same memory; each gradient autograd accumulates into it moves, wrapped in the parameter's
    own layout, into the parameter's ``grad`` (added to one already there)."""
    local = param._local_tensor
    kept = param.__dict__.get("_shardimpl_leaf")
    if kept is not None and kept[0] is local:
        return kept[1]
    leaf = local.detach().requires_grad_()
    spec = DTensorSpec(param.device_mesh, tuple(param.placements),
                       tensor_meta=TensorMeta(param.shape, param.stride(), param.dtype))
    owner = weakref.ref(param)

    def move(leaf):
        grad, target = leaf.grad, owner()
        leaf.grad = None
        if grad is None or target is None:
            return
        grad = _plain_gradient(grad)
        wrapped = DTensor.__new__(DTensor, grad, copy.copy(spec), requires_grad=False)
        target.grad = wrapped if target.grad is None else target.grad + wrapped

    leaf.register_post_accumulate_grad_hook(move)
    param.__dict__["_shardimpl_leaf"] = (local, leaf)
    return leaf


def from_local(local: torch.Tensor, mesh, placements, shape=None, stride=None) -> DTensor:
    """``DTensor.from_local(local, mesh, placements, run_check=False, shape=..., stride=...)``
    with the layout built once. Without ``shape``: every placement Replicate, the global
    tensor is ``local`` itself (other layouts need their global shape)."""
    placements = tuple(placements)
    if shape is None:
        if any(not p.is_replicate() for p in placements):
            raise ValueError(f"from_local needs the global shape for placements {placements}; pass shape=.")
        shape, stride = tuple(local.shape), tuple(local.stride())
    shape = tuple(shape)
    stride = contiguous_stride(shape) if stride is None else tuple(stride)
    return from_spec(local, _spec(mesh, placements, shape, stride, local.dtype))


def layout_of(mesh, placements, shape, dtype, stride=None):
    """The layout `from_local` gives a ``dtype`` tensor of global ``shape`` laid out as
    ``placements`` (a contiguous stride unless given), for `from_spec`."""
    shape = tuple(shape)
    return _spec(mesh, tuple(placements), shape, contiguous_stride(shape) if stride is None else tuple(stride), dtype)


def from_spec(local: torch.Tensor, spec) -> DTensor:
    """`from_local` with the layout built by the caller (`layout_of`), e.g. once per layer."""
    spec = copy.copy(spec)
    if not torch.is_grad_enabled():
        return DTensor(local, spec, requires_grad=False)
    out = _FromLocal.apply(local, spec)
    out.__dict__["_shardimpl_made"] = (local, out.grad_fn)  # for to_local's shortcut (module docstring)
    return out


class _SumPartial(torch.autograd.Function):
    """Forward: the local tensor's copy all-reduced (sum) over each of ``groups``, wrapped as
    ``spec`` (the input's layout with Replicate for Partial). Backward: the gradient as it is,
    laid out as ``spec`` (each rank's partial term gets the whole gradient)."""

    @staticmethod
    def forward(ctx, x, groups, spec):
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        local = x._local_tensor.clone(memory_format=torch.contiguous_format)
        for group in groups:
            torch.distributed.all_reduce(local, group=group)
        return DTensor(local, spec, requires_grad=x.requires_grad)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        if not isinstance(grad, DTensor):  # a replicated gradient handed back as a plain tensor
            return DTensor(grad, ctx.spec, requires_grad=grad.requires_grad), None, None
        if tuple(grad.placements) != tuple(ctx.spec.placements):
            target = DTensorSpec(ctx.spec.mesh, ctx.spec.placements, tensor_meta=grad._spec.tensor_meta)
            grad = DTensor(redistribute_local_tensor(grad._local_tensor, grad._spec, target), target,
                           requires_grad=grad.requires_grad)
        return grad, None, None


class _SumOverGroups(torch.autograd.Function):
    """Megatron's g on a local tensor: forward, a copy summed over each group's ranks (one
    all-reduce per group); backward, the gradient as it is."""

    @staticmethod
    def forward(ctx, x, groups):
        out = x.clone(memory_format=torch.contiguous_format)
        for group in groups:
            torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_groups(local: torch.Tensor, groups) -> torch.Tensor:
    """``local`` summed over the ranks of each process group in ``groups`` (differentiable:
    the gradient passes unchanged, as each rank's term gets the sum's whole gradient)."""
    return _SumOverGroups.apply(local, list(groups))


def sum_partial(x: DTensor) -> DTensor:
    """``x`` with each Partial(sum) placement summed to Replicate (module docstring); ``x``
    itself where nothing is partial; DTensor's redistribute for other reductions (avg, max)."""
    placements = tuple(x.placements)
    partial = [axis for axis, p in enumerate(placements) if p.is_partial()]
    if not partial:
        return x
    summed = _for_grad(placements)
    if any(getattr(placements[a], "reduce_op", None) != "sum" for a in partial):
        return x.redistribute(x.device_mesh, summed)
    mesh = x.device_mesh
    spec = copy.copy(_spec(mesh, summed, tuple(x.shape), contiguous_stride(x.shape), x.dtype))  # a contiguous copy
    return _SumPartial.apply(x, [mesh.get_group(a) for a in partial], spec)
