"""Variable creation under a distribution: each Keras variable made already sharded.

Under a distribution, a variable's layout comes from
``distribution.get_variable_layout(variable)`` (the LayoutMap, or replicated
when unmatched) and its value is a DTensor holding only this rank's shard,
made by `shardimpl.distribute_variable`, wrapped in a Parameter whose
gradient keeps the variable's own layout.

A variable created this way is marked on the object itself (its class
becomes a guarded subclass, nothing global): reading its value when
shardimpl is no longer installed, or with no distribution set, raises one
clear error instead of torch's "mixed torch.Tensor and DTensor". Read by a
layer's ``call`` inside a step or direct call, a variable split along the
data axis reads as gathered along that axis (`shardimpl.keras.fsdp`).

One kind of variable stays a plain tensor, as in stock Keras: a scalar that is not trained (a
metric's total and count, the optimizer's iteration counter, a loss scale). It cannot be split,
every rank updates it the same way from replicated values, and as a DTensor each update and
read of it was a DTensor dispatch (12 of a 64 MiB mlp step's 24, ~1 ms); a replicated DTensor
assigned to it is taken whole (`shardimpl.keras.saving.wrap_direct_assign`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from shardimpl.create import distribute_variable
from shardimpl.keras.active import current_distribution, is_installed
from shardimpl.keras.compat import in_symbolic_scope
from shardimpl.keras.context import in_layer_call
from shardimpl.keras.fsdp import value_for_compute
from shardimpl.reshard import can_reshard_p2p, reshard_p2p

__all__ = [
    "wrap_initialize_with_initializer",
    "wrap_initialize",
    "sharded_parameter",
    "is_sharded_variable",
    "kept_plain",
    "ShardedVariableError",
]


class ShardedVariableError(RuntimeError):
    """A variable created sharded by shardimpl was used outside shardimpl's integration."""


def _layout_for(variable):
    distribution = current_distribution()
    if distribution is None or kept_plain(variable):
        return None
    return distribution.get_variable_layout(variable)


def kept_plain(variable) -> bool:
    """True for a variable created plain under a distribution: a scalar that is not trained
    (module docstring)."""
    shape = getattr(variable, "_shape", None)
    return shape is not None and len(shape) == 0 and not variable.trainable


def sharded_parameter(value, trainable: bool) -> torch.nn.Parameter:
    """Wrap a DTensor as a Parameter whose gradient keeps the parameter's own layout.

    DTensor's backward may return a gradient as Partial(sum) or on another
    dim; reducing it to the parameter's placements right away keeps grads (and
    the optimizer slots built from them) sharded like the variable.
    """
    param = torch.nn.Parameter(value, requires_grad=trainable)
    if trainable:
        mesh, placements = value.device_mesh, value.placements

        def _to_param_layout(grad):
            if getattr(grad, "placements", placements) == placements:
                return grad
            if can_reshard_p2p(grad, placements):
                return reshard_p2p(grad, placements)  # gloo's all-to-all would gather it all
            return grad.redistribute(mesh, placements)

        param.register_hook(_to_param_layout)
    return param


# --- the per-variable guard -------------------------------------------------------------

_GUARDED: dict = {}


def _guard_message(variable) -> str:
    placements = getattr(variable._value, "placements", None)
    why = (
        "shardimpl is not installed any more" if not is_installed()
        else "no keras.distribution is set"
    )
    return (
        f"variable {variable.path!r} was created sharded by shardimpl (a DTensor, placements "
        f"{placements}) and can only be used while shardimpl is installed and its distribution "
        f"is set, but {why}. Call shardimpl.install() and "
        "keras.distribution.set_distribution(...) again before using this model (or save it "
        "with model.save / shardimpl.save_sharded while they are set, and load it into a "
        "model built without a distribution)."
    )


def _guarded_class(cls):
    """``cls`` with a ``value`` that refuses to be read outside shardimpl (cached per class)."""
    sub = _GUARDED.get(cls)
    if sub is not None:
        return sub
    base_value = cls.value  # Keras' property

    def value(self):
        distribution = current_distribution() if is_installed() else None
        if distribution is None:
            raise ShardedVariableError(_guard_message(self))
        value = base_value.fget(self)  # the shard, or its autocast copy (same layout)
        if isinstance(value, DTensor) and in_layer_call() and not in_symbolic_scope():
            return value_for_compute(value, distribution)  # gathered along the data axis (FSDP)
        return value

    sub = type(cls.__name__, (cls,), {"value": property(value), "__module__": cls.__module__,
                                       "_shardimpl_sharded": True, "__qualname__": cls.__qualname__})
    _GUARDED[cls] = sub
    _GUARDED[sub] = sub
    return sub


def is_sharded_variable(variable) -> bool:
    """True for a Keras variable whose value shardimpl created as a DTensor."""
    return getattr(type(variable), "_shardimpl_sharded", False)


def _adopt(variable, layout, dtensor) -> None:
    variable._layout = layout  # optimizer slots made from this variable take the same layout
    variable._value = sharded_parameter(dtensor, variable.trainable)
    variable.__class__ = _guarded_class(type(variable))


def wrap_initialize_with_initializer(original):
    def _initialize_with_initializer(self, initializer):
        layout = _layout_for(self)
        if layout is None:
            return original(self, initializer)
        value = distribute_variable(initializer, layout, shape=self._shape, dtype=self._dtype, name=self.path)
        _adopt(self, layout, value)

    return _initialize_with_initializer


def wrap_initialize(original):
    def _initialize(self, value):
        if isinstance(value, torch.nn.Parameter):
            return original(self, value)
        if self._shape is None:  # Keras sets it from the value right after; layouts need it now
            self._shape = tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))
        layout = _layout_for(self)
        if layout is None:
            return original(self, value)
        if not isinstance(value, torch.Tensor):
            value = np.asarray(value)
        _adopt(self, layout, distribute_variable(value, layout, dtype=self._dtype, name=self.path))

    return _initialize
