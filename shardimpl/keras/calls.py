"""Direct calls: a model or layer called in the user's eager code runs as it would in a step.

``model(x)``, ``layer(x)``, Keras' first-call build fallback and keras-hub's
``generate()`` (which calls the backbone's layers one by one) all enter
`Layer.__call__`. Under a distribution, the outermost such call (one not
already inside a shardimpl step or call) runs in `step_context` (plain
tensors mix with DTensors as replicated values; math attention) and hands
its caller plain tensors back: a replicated DTensor as its local tensor (no
communication), any other (sharded along the batch, Partial, vocabulary-split
logits) as its full tensor. Both conversions are differentiable, so a custom
training loop's ``loss.backward()`` reaches the sharded variables. Nested
calls return DTensors, as inside Keras' own steps.

The backward of such a call runs later, in the user's ``loss.backward()``,
outside the call, where DTensor no longer lets plain tensors mix in (and the
autograd engine keeps the setting that held when ``backward()`` started).
So plain tensor and array inputs enter the call as the replicated DTensors
they stand for (views, no copy; in-place updates of them, such as a KV cache
write, are then DTensor ops too), and while the call runs every plain tensor
an op saves for its backward (a constant made inside a layer) is saved as a
replicated DTensor: the backward meets DTensors only.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Replicate

from shardimpl.keras.active import current_distribution, is_installed
from shardimpl.keras import dense_plan
from shardimpl.keras.context import is_within, layer_call, sharded_reads, step_context
from shardimpl.mesh import local_device, to_torch_mesh

__all__ = ["wrap_layer_call", "wrap_embedding_call", "wrap_forward", "wrap_track_variables", "to_plain"]


def _plain(x):
    if not isinstance(x, DTensor):
        return x
    mask = getattr(x, "_keras_mask", None)
    if all(isinstance(p, Replicate) for p in x.placements):
        out = x.to_local()
    else:
        out = x.full_tensor()
    if mask is not None:
        out._keras_mask = _plain(mask)
    return out


def _replicated(t, mesh):
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _saved_as_dtensor(mesh):
    """Pack for saved-tensor hooks: a plain tensor saved for backward is kept as a replicated DTensor."""

    def pack(t):
        if isinstance(t, DTensor) or t.requires_grad or t.device.type == "meta":
            return t
        return _replicated(t, mesh)

    return pack


def _inputs_as_dtensors(args, kwargs, mesh):
    """Plain tensor and array inputs as the replicated DTensors they stand for (differentiable)."""
    from keras.src import tree

    device = local_device(mesh)

    def one(x):
        if isinstance(x, np.ndarray) and x.dtype != object:
            x = torch.as_tensor(x)
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) and x.device.type != "meta":
            return _replicated(x.to(device), mesh)
        return x

    return tree.map_structure(one, args), tree.map_structure(one, kwargs)


def to_plain(outputs):
    """Every DTensor in ``outputs`` (any nesting) as the plain tensor it stands for."""
    from keras.src import tree

    if isinstance(outputs, torch.Tensor):
        return _plain(outputs)
    return tree.map_structure(_plain, outputs)


def wrap_layer_call(original):
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        if is_within():
            out = dense_plan.fast_call(self, args, kwargs)  # None unless a planned Dense call
            return original(self, *args, **kwargs) if out is None else out
        distribution = current_distribution() if is_installed() else None
        if distribution is None:
            return original(self, *args, **kwargs)
        mesh = to_torch_mesh(distribution.device_mesh)
        args, kwargs = _inputs_as_dtensors(args, kwargs, mesh)
        with step_context(_saved_as_dtensor(mesh)):
            outputs = original(self, *args, **kwargs)
        return to_plain(outputs)

    return __call__


def wrap_embedding_call(original):
    """Keras' Embedding.call: a DTensor table is looked up by `shardimpl.embedding.embedding_lookup`
    (a vocabulary-split table hits a torch DTensor defect otherwise); anything else as stock."""

    @functools.wraps(original)
    def call(self, inputs):
        table = getattr(self, "_embeddings", None)
        if (not isinstance(getattr(table, "_value", None), DTensor) or getattr(self, "quantization_mode", None)
                or getattr(self, "lora_enabled", False)):
            return original(self, inputs)
        with sharded_reads():  # the lookup reads the shard: it moves ids, never the table
            value = table.value  # a meta stand-in during Keras' symbolic build: stock lookup then
        if not isinstance(value, DTensor):
            return original(self, inputs)
        from keras.src import ops

        from shardimpl.embedding import embedding_lookup

        ids = torch.as_tensor(inputs) if isinstance(inputs, np.ndarray) else inputs
        return ops.cast(embedding_lookup(ids, value), dtype=self.compute_dtype)

    return call


def wrap_forward(original):
    """TorchLayer.forward (it runs the layer's ``call``, after any build): inside shardimpl's
    context, the variables the call reads come gathered along the data axis (FSDP)."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not is_within():
            return original(self, *args, **kwargs)
        with layer_call():
            return original(self, *args, **kwargs)

    return forward


def wrap_track_variables(original):
    """TorchLayer._track_variables / _post_track_variable register ``variable.value`` as the
    layer's torch parameters: always the sharded variable itself, never a gathered copy."""

    @functools.wraps(original)
    def track(self, *args, **kwargs):
        with sharded_reads():
            return original(self, *args, **kwargs)

    return track
