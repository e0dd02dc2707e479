"""Keras' Dense and EinsumDense calls on a sharded kernel: the local einsum of `shardimpl.tp_einsum`.

Inside shardimpl's context (a step, a direct call), a Dense or EinsumDense layer whose kernel
is a DTensor runs its matmul on the local blocks with the collectives the layouts imply
(`shardimpl.tp_einsum.local_einsum`), then adds its bias and applies its activation as Keras
does. A row-parallel output (Partial) with a bias is reduced first (one all-reduce; the bias
is added once); without a bias it stays Partial and is reduced once where it is laid out
(the layer's output layout) or consumed. Anything the local einsum has no rule for (LoRA,
quantized kernels, other dtypes, other layouts), or a call outside shardimpl's context, runs
Keras' own ``call``.
"""

from __future__ import annotations

import functools

from torch.distributed.tensor import DTensor, Replicate

from shardimpl.keras.context import is_within
from shardimpl.tp_einsum import dense_equation, local_einsum

__all__ = ["wrap_dense_call", "wrap_einsum_dense_call"]


def _kernel(layer):
    """The kernel as the call would read it (autocast, FSDP gather), or None if not a DTensor."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return None
    if not isinstance(getattr(getattr(layer, "_kernel", None), "_value", None), DTensor):
        return None
    from keras.src import ops

    value = ops.convert_to_tensor(layer.kernel)
    return value if isinstance(value, DTensor) else None


def _finish(layer, x):
    from keras.src import ops

    if layer.bias is not None:
        if isinstance(x, DTensor) and any(p.is_partial() for p in x.placements):
            x = x.redistribute(x.device_mesh, [Replicate() if p.is_partial() else p for p in x.placements])
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


def _wrap(original, equation_of):
    @functools.wraps(original)
    def call(self, inputs, training=None):
        kernel = _kernel(self) if is_within() else None
        x = None
        if kernel is not None:
            equation = equation_of(self, inputs)
            x = local_einsum(equation, inputs, kernel) if equation else None
        if x is None:
            return original(self, inputs, training=training)
        return _finish(self, x)

    return call


def wrap_dense_call(original):
    """Dense.call: ``matmul(x, kernel)`` as the einsum '...k,kn->...n' on local blocks."""
    return _wrap(original, lambda layer, inputs: dense_equation(getattr(inputs, "ndim", 0)))


def wrap_einsum_dense_call(original):
    """EinsumDense.call: the layer's own equation on local blocks."""
    return _wrap(original, lambda layer, inputs: layer.equation)
