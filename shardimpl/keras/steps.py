"""Training, evaluation and prediction steps of Keras' torch trainer on sharded variables.

Under a distribution each step:

* lays the batch out: with a data axis (a mesh axis no variable layout uses,
  e.g. "batch" of a ("batch", "model") mesh, or DataParallel's axis) each rank
  keeps its slice of the global batch along dim 0 (a DTensor sharded on that
  axis); with a model-only mesh every rank keeps the same full batch;
* runs forward and backward with plain tensors treated as replicated
  (`implicit_replication`) and with the math attention kernel (DTensor has no
  rule for the fused CPU/flash attention backward);
* loads data the same way on every rank: the host RNGs (torch, numpy) are
  agreed from rank 0 when fit/evaluate/predict start (one broadcast), so
  shuffled batches match across ranks, and Keras' multi-process check that
  refuses numpy input is not applied (shardimpl distributes the batches).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardimpl.keras.active import current_distribution
from shardimpl.keras.context import step_context
from shardimpl.layout import local_shard_bounds
from shardimpl.mesh import kept_axes, local_device, mesh_coordinate, to_torch_mesh

__all__ = [
    "data_axis", "distribute_batch", "step_context", "agree_host_rng",
    "wrap_step", "wrap_loop", "wrap_get_data_adapter", "wrap_initialize_ddp",
]


def _distribution():
    return current_distribution()


def data_axis(distribution) -> str | None:
    """The mesh axis that splits batches, or None when every rank sees the whole batch."""
    from keras.distribution import DataParallel, ModelParallel

    mesh = distribution.device_mesh
    name = distribution.batch_dim_name
    if name not in mesh.axis_names or mesh.shape[list(mesh.axis_names).index(name)] == 1:
        return None
    if isinstance(distribution, DataParallel):
        return name
    if isinstance(distribution, ModelParallel):
        layout_map = distribution._layout_map
        for key in layout_map:
            axes = layout_map[key].axes
            used = {a for entry in axes if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}
            if name in used:
                return None  # the default batch_dim_name of a 1-D mesh is the model axis
        return name
    return name


def _batch_layout(distribution):
    axis = data_axis(distribution)
    mesh = to_torch_mesh(distribution.device_mesh)
    names = list(kept_axes(distribution.device_mesh))
    placements = tuple(Shard(0) if n == axis else Replicate() for n in names)
    return mesh, placements, axis


def distribute_batch(data, distribution):
    """Every tensor of ``data`` as this rank's part of the global batch (a DTensor), or as is."""
    mesh, placements, axis = _batch_layout(distribution)
    if axis is None:
        return data
    from keras.src import tree

    coord = mesh_coordinate(mesh)
    device = _device_of(mesh)

    def one(x):
        if not isinstance(x, (torch.Tensor, np.ndarray)) or isinstance(x, DTensor) or np.ndim(x) == 0:
            return x
        x = torch.as_tensor(x)
        offsets, sizes = local_shard_bounds(tuple(x.shape), tuple(mesh.shape), placements, coord)
        local = x[offsets[0]:offsets[0] + sizes[0]].to(device)
        stride = torch.empty(x.shape, device="meta").stride()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=x.shape, stride=stride)

    return tree.map_structure(one, data)


def _device_of(mesh):
    return local_device(mesh)


def agree_host_rng() -> None:
    """Give every rank rank 0's torch and numpy RNG states (one broadcast of each)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    state = [torch.get_rng_state(), np.random.get_state()] if dist.get_rank() == 0 else [None, None]
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])


def wrap_step(original):
    @functools.wraps(original)
    def step(self, data):
        distribution = _distribution()
        if distribution is None:
            return original(self, data)
        data = distribute_batch(data, distribution)
        with step_context():
            return original(self, data)

    return step


def wrap_loop(original):
    @functools.wraps(original)
    def loop(self, *args, **kwargs):
        if _distribution() is not None:
            agree_host_rng()
        return original(self, *args, **kwargs)

    return loop


def wrap_get_data_adapter(original):
    @functools.wraps(original)
    def get_data_adapter(*args, **kwargs):
        distribution = _distribution()
        if distribution is None or not getattr(distribution, "_is_multi_process", False):
            return original(*args, **kwargs)
        # Every rank loads the same global batches; the steps lay them out.
        saved = distribution._auto_shard_dataset
        distribution._auto_shard_dataset = False
        try:
            return original(*args, **kwargs)
        finally:
            distribution._auto_shard_dataset = saved

    return get_data_adapter


def wrap_initialize_ddp(original):
    """keras-nightly wraps DataParallel models in DistributedDataParallel; shardimpl's
    variables are DTensors whose gradients are already reduced to their layout, so
    DDP (which cannot take DTensor parameters) is skipped under a distribution."""

    @functools.wraps(original)
    def _initialize_ddp(self, *args, **kwargs):
        if _distribution() is not None:
            return None
        return original(self, *args, **kwargs)

    return _initialize_ddp
