"""Keras torch-backend ops that need a DTensor-aware form.

``slice_update`` with tensor start indices writes through ``index_put_`` with
index grids over every dim; DTensor has no way to do that in place on a value
split along a dim (keras-hub's sampler writes each generated token into a
prompt laid out along the batch axis). Such a value is gathered along the
split axes for the update and laid out again afterwards (the prompt is small;
an all-gather and a local slice per call).
"""

from __future__ import annotations

import functools

from torch.distributed.tensor import DTensor, Replicate

__all__ = ["wrap_slice_update"]


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
