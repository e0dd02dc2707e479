"""Keras' Dense and EinsumDense calls on a sharded kernel: the local einsum of `shardimpl.tp_einsum`.

Inside shardimpl's context (a step, a direct call), a Dense or EinsumDense layer whose kernel
is a DTensor runs its matmul on the local blocks with the collectives the layouts imply
(`shardimpl.tp_einsum.local_einsum`), then adds its bias and applies its activation as Keras
does. A row-parallel output (Partial) with a bias is reduced first (one all-reduce; the bias
is added once). Without a bias it stays Partial only where the distribution lays the layer's
output out (``"<layer path>/output"`` in its LayoutMap): that layout reduces it once, a
reduce-scatter for sequence parallelism. With no such layout it is all-reduced at once, as
Megatron's g: left Partial, DTensor reduced it where it was consumed, once per consumer (a
keras-hub Gemma block's residual add, its norm's square, the next projections), and moved the
residual stream's gradients between Partial and Replicate in backward: 30 all-reduces a step at
N = 2 where the hand-written layout needs 13. Where the output is not Partial and the bias's layout
matches it (split with the output's last dim, or replicated), the bias add and an elementwise
activation (`ELEMENTWISE`) run on the local block too, and the result is wrapped once: no
DTensor dispatch forward or backward for them. Anything the local einsum has no rule for (LoRA,
quantized kernels, other dtypes, other layouts), or a call outside shardimpl's context, runs
Keras' own ``call``.
"""

from __future__ import annotations

import functools

from torch.distributed.tensor import DTensor, Partial, Replicate

from shardimpl.keras.active import current_distribution
from shardimpl.keras.context import is_within
from shardimpl.keras import dense_plan
from shardimpl.local_views import from_local, from_spec, layout_of, sum_partial
from shardimpl.tp_einsum import dense_equation, local_einsum_parts

#: Keras activations that act on each element alone: they give the same values on a block.
ELEMENTWISE = ("linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "sigmoid",
               "hard_sigmoid", "hard_silu", "hard_swish", "tanh", "softplus", "softsign", "mish", "exponential",
               "celu")

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


def _output_path() -> str:
    """Where Keras' ``Layer.__call__`` looks up the output's layout after the call: here,
    inside it, the same path."""
    from keras.src.backend.common.name_scope import current_path

    return current_path() + "/output"


def _laid_out(layer) -> bool:
    """Whether the current distribution lays this layer's output out."""
    lookup = getattr(current_distribution(), "get_tensor_layout", None)
    return lookup is not None and bool(lookup(_output_path()))


def _finish(layer, x):
    from keras.src import ops

    if isinstance(x, DTensor) and (layer.bias is not None or not _laid_out(layer)):
        x = sum_partial(x)
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


@functools.lru_cache(maxsize=None)
def _elementwise_functions() -> frozenset:
    from keras import activations

    return frozenset(f for f in (getattr(activations, n, None) for n in ELEMENTWISE) if f is not None)


def _bias_grad_placements(bias, placements, ndim):
    """The bias's gradient placements for a local add to an output laid out as ``placements``,
    or None where the bias's layout does not match the output's block (or the bias is not one
    vector along the output's last dim, as EinsumDense's may be)."""
    if bias.ndim != 1:
        return None
    grads = []
    for p_out, p_b in zip(placements, bias.placements):
        if p_out.is_shard() and p_out.dim == ndim - 1:
            if not (p_b.is_shard() and p_b.dim == 0):
                return None
            grads.append(p_b)
        elif p_b.is_replicate():  # rows split (each rank sums its rows' part) or nothing split
            grads.append(Partial() if p_out.is_shard() else Replicate())
        else:
            return None
    return grads


def _finish_local(layer, parts, record: dict | None = None):
    """Bias and activation on the local block, wrapped once; None where they cannot run there.
    A Partial output with a bias or an activation is summed first (one all-reduce, as `_finish`).
    ``record`` (`shardimpl.tp_einsum.local_einsum_parts`') gets the decisions made here too."""
    from keras import activations

    y, mesh, placements, shape = parts
    if layer.activation is not None and layer.activation not in _elementwise_functions():
        return None
    partial = any(p.is_partial() for p in placements)
    if partial and layer.bias is None and layer.activation in (None, activations.linear) and _laid_out(layer):
        # Stays Partial: reduced once, by the output's layout.
        return _wrapped(y, mesh, placements, shape, record, sum_groups=(), bias=None, bias_grads=None,
                        apply_activation=False)
    summed = tuple(Replicate() if p.is_partial() else p for p in placements)
    bias = _local_bias(layer, mesh, summed, shape, y.dtype)
    if bias is False:
        return None
    bias, bias_grads = bias if bias is not None else (None, None)
    groups = ()
    if partial:  # summed on the local block: one all-reduce per partial axis (as sum_partial)
        partial_axes = [a for a, p in enumerate(placements) if p.is_partial()]
        if any(getattr(placements[a], "reduce_op", None) != "sum" for a in partial_axes):
            return None
        groups, placements = tuple(mesh.get_group(a) for a in partial_axes), summed
    y = dense_plan.finish_block(y, groups, bias, bias_grads, layer.activation)
    return _wrapped(y, mesh, placements, shape, record, sum_groups=groups, bias=bias, bias_grads=bias_grads,
                    apply_activation=layer.activation is not None)


def _wrapped(y, mesh, placements, shape, record, *, bias, **decisions):
    """``y`` wrapped in its layout; the whole call's decisions added to ``record`` (if any)."""
    spec = layout_of(mesh, placements, shape, y.dtype)
    if record:  # the einsum's decisions were recordable: so are these
        record.update(decisions, bias_value=bias, out_spec=spec, output_path=_output_path())
    return from_spec(y, spec)


def _local_bias(layer, mesh, placements, shape, dtype):
    """(the bias DTensor, its gradient placements) for a local add to an output laid out as
    ``placements``, None without a bias, False where the bias's layout does not fit the block."""
    if layer.bias is None:
        return None
    from keras.src import ops

    bias = ops.convert_to_tensor(layer.bias)
    if not (isinstance(bias, DTensor) and bias.device_mesh == mesh and bias.dtype == dtype
            and tuple(bias.shape) == (shape[-1],)):
        return False
    grads = _bias_grad_placements(bias, placements, len(shape))
    return False if grads is None else (bias, tuple(grads))


def _wrap(original, equation_of):
    @functools.wraps(original)
    def call(self, inputs, training=None):
        if not is_within():
            return original(self, inputs, training=training)
        plan = dense_plan.planned(self, inputs)
        if plan is not None:
            return dense_plan.run(plan, inputs)
        dense_plan.forget(self)
        kernel = _kernel(self)
        parts, record = None, {}
        if kernel is not None:
            equation = equation_of(self, inputs)
            parts = local_einsum_parts(equation, inputs, kernel, record) if equation else None
        if parts is None:
            return original(self, inputs, training=training)
        out = _finish_local(self, parts, record)
        if out is None:
            y, mesh, placements, shape = parts
            return _finish(self, from_local(y, mesh, placements, shape))
        if "out_spec" in record:
            dense_plan.remember(self, kernel, inputs, record)
        return out

    return call


def wrap_dense_call(original):
    """Dense.call: ``matmul(x, kernel)`` as the einsum '...k,kn->...n' on local blocks."""
    return _wrap(original, lambda layer, inputs: dense_equation(getattr(inputs, "ndim", 0)))


def wrap_einsum_dense_call(original):
    """EinsumDense.call: the layer's own equation on local blocks."""
    return _wrap(original, lambda layer, inputs: layer.equation)
