"""Keras' dot-product attention on heads- or batch-split DTensors, run on the local blocks.

Inside shardimpl's context, DTensor has no rule for the fused CPU/flash attention backward, so
`shardimpl.keras.context.step_context` sends attention through the math kernel, which DTensor
decomposes into a dozen dispatches forward and more backward. Attention is independent per
batch row and per head, though: when query, key and value are DTensors with the same
placements, each Replicate or split along the batch (dim 0) or the heads (dim 2 of Keras'
(batch, seq, heads, dim) layout), with no mask and no bias (causal or not), each rank runs
Keras' own function on its local blocks (any kernel torch picks, fused included) and the
output takes the same placements. No collective; the local output block only. Anything else
(a mask, a sequence split, mixed placements) runs Keras' function on the DTensors as before.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

from shardimpl.fsdp import local_saves
from shardimpl.keras.context import is_within
from shardimpl.local_views import from_local, to_local

__all__ = ["wrap_dot_product_attention"]

_SPLITTABLE_DIMS = (0, 2)  # batch and heads of (batch, seq, heads, dim)


def _local_placements(query, key, value):
    tensors = (query, key, value)
    if not all(isinstance(t, DTensor) and t.ndim == 4 for t in tensors):
        return None
    placements = query.placements
    if any(t.placements != placements or t.device_mesh != query.device_mesh for t in tensors[1:]):
        return None
    for p in placements:
        if p.is_partial() or (p.is_shard() and p.dim not in _SPLITTABLE_DIMS):
            return None
    return placements


def wrap_dot_product_attention(original):
    @functools.wraps(original)
    def dot_product_attention(query, key, value, bias=None, mask=None, scale=None, is_causal=False,
                              flash_attention=None, **kwargs):
        placements = (_local_placements(query, key, value)
                      if is_within() and bias is None and mask is None and not kwargs.get("attn_logits_soft_cap")
                      else None)
        if placements is None:
            return original(query, key, value, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                            flash_attention=flash_attention, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The kernels torch would pick outside shardimpl (the math kernel stays the fallback);
        # tensors saved for backward stay local (a direct call's hooks would wrap them).
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]), \
                local_saves():
            out = original(to_local(query), to_local(key), to_local(value), bias=None, mask=None, scale=scale,
                           is_causal=is_causal, flash_attention=flash_attention, **kwargs)
        shape = torch.Size((*query.shape[:3], value.shape[3]))
        stride = (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)
        return from_local(out, query.device_mesh, placements, shape, stride)

    return dot_product_attention
