"""A sharded Dense / EinsumDense call's decisions, made once per layer and input layout.

`shardimpl.keras.dense` decides on every call how a layer with a DTensor kernel runs on the
local blocks: the kernel as the call reads it (autocast, FSDP), the row of
`shardimpl.tp_einsum`'s table, the output's layout and global shape, the bias's gradient
layout, whether the activation is elementwise. In a training loop each call of a layer asks
the same questions and gets the same answers: measured on this machine, about 0.1 ms of Python
per call on one core, 22 calls per step of the 3-block transformer.

A `Plan` keeps those answers on the layer for the input layout, shape and dtype they were made
for. A later call takes it (`planned`) only while everything it was made from still holds: the
layer reads the very same kernel and bias DTensors (a variable assigned a new value, a cast
or an FSDP gather gives another object), the same activation, the same distribution, no LoRA
or quantization; then the call costs the local matmul, the autograd nodes of
`shardimpl.local_views` and these checks. Anything else runs the full path, which records a
new plan where one applies. A plan holds the kernel and bias weakly: it never keeps a replaced
shard alive. The math and the collectives are the full path's own: the plan
only skips deciding them again.

`fast_call` goes one step further, for a planned call made the plain way, ``layer(x)`` (or
``layer(x, training=...)``, as a Functional model calls it): Keras' ``Layer.__call__`` would
convert nothing, check the input spec it checked when the plan was made, build nothing, find no
mask to propagate, no activity regularizer and no output layout, and run ``call`` through torch's
``Module.__call__``; measured, that machinery costs as much as the planned call itself (about
0.2 ms per call on this machine's CPU). So where all of that holds (no mask on the input, no
torch module hooks, no remat, no activity regularizer, Keras' own ``compute_mask``, no layout for
``"<layer path>/output"`` in the distribution's map, looked up at every call) it runs the plan
directly. Anything else, and every first call, goes through Keras.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from shardimpl.fsdp import local_saves
from shardimpl.keras.active import current_distribution
from shardimpl.local_views import from_spec, sum_over_groups, to_local
from shardimpl.tp_einsum import local_contract

__all__ = ["Plan", "planned", "run", "fast_call", "finish_block", "remember", "forget"]

_ATTRIBUTE = "_shardimpl_dense_plan"


@dataclass(frozen=True)
class Plan:
    """What a call with this input layout does (module docstring); ``out_spec`` is the output's
    layout, built once."""

    distribution: object
    kernel: weakref.ref  # to the kernel DTensor: a plan never keeps a replaced shard alive
    bias: weakref.ref | None
    activation: object
    x_placements: tuple | None  # None: a plain input that needs no gradient (the batch, as is)
    x_shape: torch.Size
    x_dtype: torch.dtype
    equation: str
    gx: tuple
    gw: tuple
    reduce_axes: tuple
    sum_groups: tuple  # groups a Partial output is summed over before its bias / activation
    bias_grads: tuple | None
    apply_activation: bool
    out_spec: object
    output_path: str  # "<layer path>/output": where the distribution would lay the output out


def _reads(layer):
    """(kernel, bias) DTensors as the layer holds them, or None under LoRA or quantization."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return None
    kernel = getattr(getattr(layer, "_kernel", None), "_value", None)
    bias_variable = getattr(layer, "bias", None)
    return kernel, (None if bias_variable is None else getattr(bias_variable, "_value", None))


def planned(layer, x):
    """The layer's plan if it applies to this call (module docstring), else None."""
    plan = layer.__dict__.get(_ATTRIBUTE)
    if plan is None or _input_layout(x) != plan.x_placements:
        return None
    reads = _reads(layer)
    if (reads is None or reads[0] is not plan.kernel() or reads[1] is not _deref(plan.bias)
            or layer.activation is not plan.activation or x.dtype != plan.x_dtype
            or x.shape != plan.x_shape or current_distribution() is not plan.distribution):
        return None
    return plan


_NOT_PLANNED = object()


def _input_layout(x):
    """What a plan keys its input by: a DTensor's placements; None for a plain tensor that needs
    no gradient (the batch of a step without a data axis, which `local_contract` takes as is);
    anything else is never planned."""
    if isinstance(x, DTensor):
        return tuple(x.placements)
    if isinstance(x, torch.Tensor) and not x.requires_grad:
        return None
    return _NOT_PLANNED


def run(plan: Plan, x) -> DTensor:
    """The call, as the full path runs it, with the plan's decisions."""
    y = local_contract(plan.equation, x, plan.kernel(), plan.gx, plan.gw, plan.reduce_axes, plan.out_spec.mesh)
    y = finish_block(y, plan.sum_groups, _deref(plan.bias), plan.bias_grads,
                     plan.activation if plan.apply_activation else None)
    return from_spec(y, plan.out_spec)


def fast_call(layer, args: tuple, kwargs: dict):
    """The planned call's output, skipping Keras' ``Layer.__call__`` where it would do nothing
    but run the call (module docstring); None where it would do more (the caller then calls
    Keras as usual)."""
    plan = layer.__dict__.get(_ATTRIBUTE)
    if plan is None or len(args) != 1 or (kwargs and (len(kwargs) != 1 or "training" not in kwargs)):
        return None
    x = args[0]
    if (getattr(x, "_keras_mask", None) is not None or layer.activity_regularizer is not None
            or type(layer).compute_mask is not _keras_compute_mask() or _hooked(layer)
            or getattr(layer, "_remat_mode", None) is not None or _remat_scope_active()):
        return None
    if planned(layer, x) is None or plan.distribution.get_tensor_layout(plan.output_path):
        return None
    return run(plan, x)


def _hooked(module) -> bool:
    """Whether torch would run hooks around the module's forward (its own or global ones)."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks)


def _keras_compute_mask():
    from keras.src.layers.layer import Layer

    return Layer.compute_mask


def _remat_scope_active() -> bool:
    from keras.src.backend.common.remat import get_current_remat_mode

    return get_current_remat_mode() is not None


def finish_block(y: torch.Tensor, sum_groups, bias, bias_grads, activation) -> torch.Tensor:
    """A Dense output's local block summed over ``sum_groups`` (one all-reduce each, where a
    Partial output meets a bias or an activation), then its bias's local block added (its gradient
    laid out as ``bias_grads``) and ``activation`` applied: both paths of `shardimpl.keras.dense`."""
    if sum_groups:
        y = sum_over_groups(y, sum_groups)
    with local_saves():
        if bias is not None:
            y = y + to_local(bias, bias_grads)
        if activation is not None:
            y = activation(y)
    return y


def remember(layer, kernel, x, record: dict) -> None:
    """Keep a plan on ``layer`` for calls like this one, from the full path's ``record``: only
    where that call read the layer's own kernel and bias DTensors as they are (no cast, no
    gather) from a DTensor input, or from a plain one that needs no gradient."""
    reads = _reads(layer)
    bias = record.pop("bias_value")
    layout = _input_layout(x)
    if reads is None or reads[0] is not kernel or reads[1] is not bias or layout is _NOT_PLANNED:
        return
    layer.__dict__[_ATTRIBUTE] = Plan(
        distribution=current_distribution(), kernel=weakref.ref(kernel),
        bias=None if bias is None else weakref.ref(bias), activation=layer.activation,
        x_placements=layout, x_shape=x.shape, x_dtype=x.dtype, **record)


def _deref(ref):
    return None if ref is None else ref()


def forget(layer) -> None:
    """Drop the layer's plan (the call did not match it)."""
    layer.__dict__.pop(_ATTRIBUTE, None)
