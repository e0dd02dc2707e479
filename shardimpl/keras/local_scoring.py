"""A model's replicated outputs scored in plain torch: the loss and metrics of a step.

Where a model's outputs come out replicated on every rank (the mlp's row-parallel last layer
reduces its output; a model-only mesh leaves targets whole), every rank computes the same loss
from the same values. Left as DTensors, each op of the loss, its reduction, the loss tracker and
the metrics is a DTensor dispatch, forward and backward (31 of a 64 MiB mlp step's 44). Here, in
a step (`shardimpl.keras.context.is_within`), the trainer's ``_compute_loss`` and
``compute_metrics`` receive the local tensors of every replicated DTensor among ``y``,
``y_pred`` and ``sample_weight`` (their Keras masks too) instead: plain tensors holding exactly
the values stock Keras sees. The gradient of each local output comes back replicated, as each
rank's loss is the whole loss. No collective.

Anything else keeps its DTensors: an output or target split or partial along any mesh axis
(batch-split data parallelism, vocabulary-split logits, whose losses have their own rules in
`shardimpl.keras.losses`), or a mask laid out otherwise. A user's own ``compute_loss`` gets the
plain tensors too, as it would in stock Keras.
"""

from __future__ import annotations

import functools

from torch.distributed.tensor import DTensor

from shardimpl.keras.context import is_within
from shardimpl.local_views import to_local

__all__ = ["local_if_replicated", "wrap_compute_loss", "wrap_compute_metrics"]


def _replicated(x) -> bool:
    return isinstance(x, DTensor) and all(p.is_replicate() for p in x.placements)


def local_if_replicated(*structures):
    """``structures`` with every DTensor leaf as its local tensor, or as they are (the very
    objects) unless every DTensor leaf, and every DTensor mask on one, is replicated."""
    from keras.src import tree

    leaves = [x for s in structures for x in tree.flatten(s)]
    dtensors = [x for x in leaves if isinstance(x, DTensor)]
    if not dtensors:
        return structures
    masks = [getattr(x, "_keras_mask", None) for x in dtensors]
    if not all(_replicated(x) for x in dtensors) or any(isinstance(m, DTensor) and not _replicated(m) for m in masks):
        return structures

    def local(x):
        if not isinstance(x, DTensor):
            return x
        out = to_local(x)
        mask = getattr(x, "_keras_mask", None)
        if mask is not None:
            out._keras_mask = to_local(mask) if isinstance(mask, DTensor) else mask
        return out

    return tuple(tree.map_structure(local, s) for s in structures)


def wrap_compute_loss(original):
    @functools.wraps(original)
    def _compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if is_within():
            y, y_pred, sample_weight = local_if_replicated(y, y_pred, sample_weight)
        return original(self, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)

    return _compute_loss


def wrap_compute_metrics(original):
    @functools.wraps(original)
    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if is_within():
            y, y_pred, sample_weight = local_if_replicated(y, y_pred, sample_weight)
        return original(self, x, y, y_pred, sample_weight=sample_weight)

    return compute_metrics
