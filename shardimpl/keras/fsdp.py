"""Which variables a layer reads gathered along the data axis (FSDP x TP on a 2-D mesh).

On a ("batch", "model") mesh whose "batch" axis splits batches (the data
axis, `shardimpl.keras.steps.data_axis`), a LayoutMap may split a weight
along "batch" too, so that every weight is sharded over all N ranks:

* a dim split by the data axis alone (``("batch", "model")`` on a kernel:
  rows along "batch", columns along "model") is *fully sharded data
  parallel*: while a layer's ``call`` runs in a step or direct call, its
  variable reads as gathered along "batch" only (`shardimpl.fsdp`), i.e. as
  tensor parallelism alone lays it out; the gathered block is freed after
  the op, gathered again in backward, and the gradient is reduce-scattered
  back to the variable's layout.
* a dim split by the data axis *and* other axes (``(None, ("batch",
  "model"))``) is tensor parallel over all of them: never gathered; DTensor
  moves activations instead (the right choice where a weight's block
  gathered along "batch" would be larger than the activations, e.g. a few
  thousand tokens against a 4 d x d MLP kernel).
* embedding tables are never gathered: a lookup moves ids, not the table
  (`shardimpl.embedding`).

Outside a layer's ``call`` (the optimizer, reading gradients, saving) a
variable always reads as its shard.
"""

from __future__ import annotations

import weakref

from torch.distributed.tensor import DTensor, Shard

from shardimpl.fsdp import gather_for_compute
from shardimpl.mesh import kept_axes

__all__ = ["gather_axis", "value_for_compute"]


def gather_axis(value, distribution) -> int | None:
    """The torch mesh axis ``value`` is gathered along while a layer computes with it, or None."""
    if not isinstance(value, DTensor) or not any(isinstance(p, Shard) for p in value.placements):
        return None
    name, names = _data_axis_cached(distribution)
    if name is None or name not in names or len(value.placements) != len(names):
        return None
    axis = names.index(name)
    placement = value.placements[axis]
    if not isinstance(placement, Shard):
        return None
    if any(isinstance(p, Shard) and p.dim == placement.dim for i, p in enumerate(value.placements) if i != axis):
        return None  # the dim is split over the data axis and others: tensor parallel over all of them
    return axis


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _data_axis_cached(distribution):
    """(data axis name, kept mesh axes) of ``distribution``, cached per distribution object
    (and re-derived if its LayoutMap grows): read for every variable a layer reads."""
    from shardimpl.keras.steps import data_axis

    layout_map = getattr(distribution, "_layout_map", None)
    stamp = len(getattr(layout_map, "_layout_map", ())) if layout_map is not None else 0
    try:
        cached = _CACHE.get(distribution)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    result = (data_axis(distribution), kept_axes(distribution.device_mesh))
    try:
        _CACHE[distribution] = (stamp, result)
    except TypeError:
        pass
    return result


def value_for_compute(value, distribution):
    """``value`` as a layer computes with it: gathered along the data axis if it is split along it."""
    axis = gather_axis(value, distribution)
    return value if axis is None else gather_for_compute(value, axis)
