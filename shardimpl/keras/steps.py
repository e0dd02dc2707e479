"""Training, evaluation and prediction steps of Keras' torch trainer on sharded variables.

Under a distribution each step:

* lays the batch out: with a data axis (`data_axis`: "batch" of a
  ("batch", "model") mesh, or DataParallel's axis) each rank keeps its slice
  of the global batch along dim 0 (a DTensor sharded on that axis); with a
  model-only mesh every rank keeps the same full batch, and so does a batch
  the data axis does not divide (`splits_evenly`: the last partial batch of
  an epoch, a batch smaller than the data axis): DTensor refuses ops such as
  a reshape on an unevenly split dim, and a replicated batch computes
  exactly what stock Keras computes (loss reductions, metrics, batch
  statistics), at the price of every rank computing that whole batch;
* runs forward and backward with plain tensors treated as replicated
  (`implicit_replication`) and with the math attention kernel (DTensor has no
  rule for the fused CPU/flash attention backward); variables split along the
  data axis read as gathered while their layer runs (`shardimpl.keras.fsdp`);
* loads data the same way on every rank: the host RNGs (torch, numpy) are
  agreed from rank 0 when fit/evaluate/predict start (one broadcast), so
  shuffled batches match across ranks, and Keras' multi-process check that
  refuses numpy input is not applied (shardimpl distributes the batches).
"""

from __future__ import annotations

import functools
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardimpl.keras.active import current_distribution
from shardimpl.keras.context import step_context
from shardimpl.layout import local_shard_bounds
from shardimpl.local_views import parameter_leaves
from shardimpl.rendezvous import explain
from shardimpl.mesh import kept_axes, local_device, mesh_coordinate, to_torch_mesh

__all__ = [
    "data_axis", "distribute_batch", "splits_evenly", "step_context", "agree_host_rng",
    "wrap_step", "wrap_predict_step", "wrap_loop", "wrap_get_data_adapter", "wrap_initialize_ddp",
    "wrap_should_torch_compile",
]


def _distribution():
    return current_distribution()


def data_axis(distribution) -> str | None:
    """The mesh axis that splits batches, or None when every rank sees the whole batch.

    It is the distribution's ``batch_dim_name`` when the mesh has it with size > 1. Variables
    may be split along it too (fully sharded data parallel: `shardimpl.keras.fsdp` gathers them
    along it while a layer runs). One exception keeps model-only meshes working: on a mesh
    with a single axis of size > 1, an axis that a ModelParallel layout uses is the model
    axis (Keras names the first mesh axis ``batch_dim_name`` by default), and batches are
    not split.
    """
    from keras.distribution import ModelParallel

    mesh = distribution.device_mesh
    name = distribution.batch_dim_name
    names = list(mesh.axis_names)
    if name not in names or mesh.shape[names.index(name)] == 1:
        return None
    if isinstance(distribution, ModelParallel) and len(kept_axes(mesh)) == 1 and _layouts_use(distribution, name):
        return None
    return name


def _layouts_use(distribution, name: str) -> bool:
    layout_map = distribution._layout_map
    for key in layout_map:
        for entry in layout_map[key].axes:
            if entry is not None and name in ((entry,) if isinstance(entry, str) else tuple(entry)):
                return True
    return False


def _batch_layout(distribution):
    axis = data_axis(distribution)
    mesh = to_torch_mesh(distribution.device_mesh)
    names = list(kept_axes(distribution.device_mesh))
    placements = tuple(Shard(0) if n == axis else Replicate() for n in names)
    return mesh, placements, axis


def _batch_arrays(data) -> list:
    """The tensors and arrays of ``data`` that a step lays out (dim 0 is the batch)."""
    from keras.src import tree

    return [x for x in tree.flatten(data) if isinstance(x, (torch.Tensor, np.ndarray))
            and not isinstance(x, DTensor) and np.ndim(x) > 0]


def splits_evenly(data, parts: int) -> bool:
    """True if every batch array in ``data`` has a dim 0 that ``parts`` divides."""
    return all(int(x.shape[0]) % parts == 0 for x in _batch_arrays(data))


def distribute_batch(data, distribution):
    """Every tensor of ``data`` as this rank's part of the global batch (a DTensor), or as is.

    Without a data axis, as is. Where the data axis does not divide every
    array's dim 0 (`splits_evenly`), as a replicated DTensor: every rank
    holds (and computes) the whole batch. No communication: every rank loads
    the same global batch and keeps its slice or all of it.
    """
    mesh, placements, axis = _batch_layout(distribution)
    if axis is None:
        return data
    if not splits_evenly(data, mesh.size(placements.index(Shard(0)))):
        placements = (Replicate(),) * mesh.ndim
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
    """Keras' torch train / test step under a distribution: the batch laid out, the step in
    `step_context`, and parameters' local uses through their local leaves (Keras' step reads the
    gradients from ``.grad``: `shardimpl.local_views.parameter_leaves`)."""
    @functools.wraps(original)
    def step(self, data):
        distribution = _distribution()
        if distribution is None:
            return original(self, data)
        data = distribute_batch(data, distribution)
        # Without a data axis nothing is gathered for FSDP: no saved-tensor hooks in the step.
        with step_context(regather=data_axis(distribution) is not None), parameter_leaves():
            return original(self, data)

    return step


def wrap_predict_step(original):
    """A predict step whose outputs come back as host tensors, gathered in the step.

    Keras converts each batch's outputs to numpy in a callback thread (its
    async ``on_predict_batch_end``) and again at the end; gathering a split
    output there would issue collectives from several threads at once, in an
    order that differs across ranks (a hang). Gathered here instead: once per
    batch, in the main thread, in step order. Communication: per output split
    along any axis, `shardimpl.gather_variable` (an agreement and one
    broadcast per shard); none for replicated outputs. Memory: the outputs on
    the host, as `predict` returns them anyway, instead of on the device.
    """
    stepped = wrap_step(original)

    @functools.wraps(original)
    def predict_step(self, data):
        outputs = stepped(self, data)
        if _distribution() is None:
            return outputs
        from keras.src import tree

        return tree.map_structure(_on_host, outputs)

    return predict_step


def _on_host(x):
    if not isinstance(x, DTensor):
        return x
    from shardimpl.gather import gather_variable

    return gather_variable(x.detach(), device="cpu")


def wrap_loop(original):
    @functools.wraps(original)
    def loop(self, *args, **kwargs):
        if _distribution() is None:
            return original(self, *args, **kwargs)
        try:
            agree_host_rng()
            return original(self, *args, **kwargs)
        except Exception as exc:  # a rank stopped or cut off: name it (shardimpl.rendezvous)
            named = explain(exc, f"{original.__name__}()")
            if named is not None:
                raise named from exc
            raise

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


def wrap_should_torch_compile(original):
    """``TorchTrainer._should_torch_compile``: under a distribution, ``jit_compile=True`` runs the
    steps eagerly, with a warning, as Keras itself does for a model that does not support it.

    Keras' ``jit_compile=True`` wraps the step in ``torch.compile``. Dynamo cannot trace
    shardimpl's sharded step (its local views keep per-tensor state on DTensors; measured with
    torch 2.13: the first step raised ``InternalTorchDynamoError`` in
    `shardimpl.local_views.from_spec`), and on this project's CPU machine it did not pay off for
    stock Keras' Llama-shaped transformer either (64 MiB, one process: 279 ms a step compiled, with
    recompilations, against 263 ms eager; the mlp 54 against 58 ms). ``jit_compile`` itself is left
    as the user set it: without a distribution the same model compiles as stock.
    """

    warned = weakref.WeakSet()  # once per model, not once per train / test / predict function

    @functools.wraps(original)
    def _should_torch_compile(self):
        wanted = original(self)
        if not wanted or _distribution() is None:
            return wanted
        if self not in warned:
            warned.add(self)
            warnings.warn(
                f"Model {self.name!r} was compiled with jit_compile=True: under a shardimpl distribution "
                f"its steps run eagerly (torch.compile cannot trace the sharded step). Pass "
                f"jit_compile=False (or the default \"auto\") to model.compile() to silence this.",
                UserWarning, stacklevel=2)
        return False

    return _should_torch_compile
