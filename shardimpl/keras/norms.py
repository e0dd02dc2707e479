"""Keras' RMS normalization of a DTensor, run on the local blocks.

``torch.nn.functional.rms_norm`` is a composite op: on a DTensor it decomposes above DTensor's
dispatch into pow, mean, add, rsqrt and two multiplies forward, and about a dozen dispatches
backward, per norm. Normalizing over the last dim is independent per row, so when the input is
a float32 DTensor normalized over its last dim, not split along that dim and not Partial, and the
scale is replicated, each rank runs torch's fused ``rms_norm`` on its local rows and the output
keeps the input's placements. The scale's gradient is a sum over rows: Partial along the mesh
axes that split the rows (reduced where the variable's layout says), whole otherwise. No
collective; the local output block only. Anything else runs Keras' function on the DTensors.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from shardimpl.fsdp import local_saves
from shardimpl.keras.context import is_within
from shardimpl.local_views import from_local, to_local

__all__ = ["wrap_rms_normalization"]


def _local_ok(x, scale, axis) -> bool:
    if not (is_within() and isinstance(x, DTensor) and x.dtype == torch.float32 and x.ndim >= 1):
        return False
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if len(axes) != 1 or axes[0] not in (-1, x.ndim - 1):
        return False
    if any(p.is_partial() or (p.is_shard() and p.dim == x.ndim - 1) for p in x.placements):
        return False
    if isinstance(scale, DTensor):
        return scale.device_mesh == x.device_mesh and all(p.is_replicate() for p in scale.placements)
    return scale is None or isinstance(scale, torch.Tensor)


def wrap_rms_normalization(original):
    @functools.wraps(original)
    def _rms_normalization(x, scale=None, axis=-1, epsilon=None):
        if scale is not None and not isinstance(scale, torch.Tensor):
            from keras.src import backend

            scale = backend.convert_to_tensor(scale)
        if not _local_ok(x, scale, axis):
            return original(x, scale=scale, axis=axis, epsilon=epsilon)
        if epsilon is None:
            from keras.src import backend

            epsilon = backend.epsilon()
        if isinstance(scale, DTensor):
            # Each rank's rows give a partial sum of the scale's gradient along the axes splitting them.
            scale = to_local(scale, [Partial() if p.is_shard() else Replicate() for p in x.placements])
        with local_saves():
            out = torch.nn.functional.rms_norm(to_local(x), (x.shape[-1],), scale, epsilon)
        return from_local(out, x.device_mesh, x.placements, x.shape, x.stride())

    return _rms_normalization
