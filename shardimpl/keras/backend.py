"""Keras' backend `distribution_lib` vocabulary for the torch backend.

Keras' distribution API (`keras.distribution.list_devices`, `initialize`,
`DeviceMesh.backend_mesh`, `TensorLayout.backend_layout`, `distribute_tensor`)
calls a backend module with these names; keras 3.15's torch backend has none.
`shardimpl.install()` puts this module in its place, and lets a TensorLayout
entry name several mesh axes (`wrap_validate_axes`). Devices are named
``"cpu:R"`` / ``"gpu:R"`` with R the global rank: one device per process.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from shardimpl.create import distribute_variable as _distribute_variable
from shardimpl.launchers import detect
from shardimpl.layout import TorchLayout
from shardimpl.local_views import sum_partial
from shardimpl.mesh import local_device, resolve_layout, to_torch_mesh, torch_placements

__all__ = [
    "list_devices", "get_device_count", "initialize", "num_processes", "process_id",
    "distribute_tensor", "distribute_variable", "distribute_data_input",
    "_to_backend_mesh", "_to_backend_layout", "_to_backend_device",
]


def _default_type(device_type):
    if device_type:
        kind = device_type.lower()
        if kind not in ("cpu", "gpu", "cuda"):
            raise ValueError(
                f"device_type must be 'cpu' or 'gpu' on the torch backend. Received: {device_type!r}."
            )
        return "gpu" if kind in ("gpu", "cuda") else "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def list_devices(device_type=None):
    """One device per process of the world: ``["cpu:0", ..., "cpu:N-1"]`` (or ``gpu:R``).

    ``gpu`` on a machine without CUDA lists none.
    """
    kind = _default_type(device_type)
    if kind == "gpu" and not torch.cuda.is_available():
        return []
    return [f"{kind}:{r}" for r in range(num_processes())]


def get_device_count(device_type=None):
    return len(list_devices(device_type))


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Join (or create) the torch.distributed world: `shardimpl.rendezvous.initialize`.

    Under torchrun or srun (or with MASTER_ADDR, MASTER_PORT, RANK and
    WORLD_SIZE set) the environment says everything. Otherwise
    ``job_addresses`` is "host:port" of rank 0 (only the first address is
    used), with ``num_processes`` and ``process_id``. Backend: NCCL when CUDA
    is available, else gloo. Every rank waits for the others at most
    ``SHARDIMPL_TIMEOUT`` seconds (default 300), at the join and in every
    collective; `shardimpl.initialize(timeout=...)` takes it as an argument.
    Collective: the rendezvous.
    """
    from shardimpl.rendezvous import initialize as join

    join(address=job_addresses, world_size=num_processes, rank=process_id)


def num_processes():
    """The world size: the process group's, or before it starts the launcher's (torchrun's
    WORLD_SIZE, SLURM's task count; `shardimpl.launchers`), 1 without a launcher."""
    if dist.is_initialized():
        return dist.get_world_size()
    found = detect()
    return found.world_size if found else 1


def process_id():
    """This process's rank: the process group's, or before it starts the launcher's."""
    if dist.is_initialized():
        return dist.get_rank()
    found = detect()
    return found.rank if found else 0


def _to_backend_device(device_name):
    """A Keras device name (``"cpu:R"``, ``"gpu:R"``, ``"cuda:R"``, or a torch.device) as a torch.device.

    ``gpu:R`` names global rank R's GPU: the local CUDA device R modulo the
    GPUs this machine has (ranks of a node are numbered consecutively).
    """
    if isinstance(device_name, torch.device):
        return device_name
    kind, _, index = str(device_name).lower().partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if kind in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(
                f"device {device_name!r} names a GPU but this torch sees no CUDA device. "
                "Use 'cpu:R' devices (keras.distribution.list_devices('cpu'))."
            )
        return torch.device("cuda", int(index or 0) % count)
    raise ValueError(f"Unknown device {device_name!r}. Use 'cpu:R' or 'gpu:R' (R = global rank).")


def _to_backend_mesh(device_mesh):
    return to_torch_mesh(device_mesh)


def _to_backend_layout(tensor_layout):
    if tensor_layout is None:
        return None
    if tensor_layout.device_mesh is None:
        raise ValueError(
            "Cannot create a backend layout for a TensorLayout without a device_mesh. "
            f"Received: {tensor_layout}. Set TensorLayout(axes, device_mesh)."
        )
    mesh = to_torch_mesh(tensor_layout.device_mesh)
    placements = torch_placements(
        tensor_layout.axes, tensor_layout.device_mesh, len(tensor_layout.axes),
        f"layout {tensor_layout}",
    )
    return TorchLayout(mesh, placements)


def distribute_variable(value, layout):
    """Keras' signature: a sharded DTensor of ``value`` laid out as ``layout``.

    ``value``: a tensor, an array, an initializer, or a Keras Variable (its
    value). ``layout=None`` returns ``value`` as is; a DTensor already laid
    out as ``layout`` is returned as is, any other DTensor is redistributed.
    """
    if layout is None:
        return value
    if hasattr(value, "path") and isinstance(getattr(value, "value", None), torch.Tensor):
        value = value.value  # a Keras Variable
    if isinstance(value, DTensor):
        return distribute_tensor(value, layout)
    return _distribute_variable(value, layout)


def distribute_tensor(tensor, layout):
    """``tensor`` (any nesting of tensors) laid out as ``layout``; differentiable.

    ``layout=None`` returns the value as is. A DTensor is redistributed (its
    collectives as DTensor decides); a plain tensor, taken as the same full
    value on every rank, becomes a replicated DTensor and then keeps this
    rank's slice (no communication). Keras calls this for activation layouts
    (``"<layer>/output"`` entries of a LayoutMap); autograd flows through both.
    """
    if layout is None:
        return tensor
    if hasattr(tensor, "path") and isinstance(getattr(tensor, "value", None), torch.Tensor):
        tensor = tensor.value  # a Keras Variable
    if isinstance(tensor, np.ndarray):
        tensor = torch.as_tensor(tensor)
    if not isinstance(tensor, torch.Tensor):
        from keras.src import tree

        return tree.map_structure(lambda t: distribute_tensor(t, layout), tensor)
    if tensor.device.type == "meta":  # Keras' symbolic trace: shapes only, nothing to lay out
        return tensor
    tl, placements = _resolved(layout, tuple(tensor.shape))
    if isinstance(tensor, DTensor):
        if tuple(tensor.placements) == placements and tensor.device_mesh == tl.mesh:
            return tensor
        if tensor.device_mesh == tl.mesh and placements == tuple(Replicate() if p.is_partial() else p
                                                                  for p in tensor.placements):
            return sum_partial(tensor)  # Partial summed where laid out: one all-reduce, no funcol wrappers
        return tensor.redistribute(tl.mesh, placements)
    replicated = DTensor.from_local(tensor.to(local_device(tl.mesh)), tl.mesh,
                                    [Replicate()] * tl.mesh.ndim, run_check=False)
    return replicated.redistribute(tl.mesh, placements)


_RESOLVED: dict = {}
_MAX_RESOLVED = 4096  # a program's activation layouts x shapes are a few hundred


def _resolved(layout, shape: tuple):
    """(`resolve_layout`'s TorchLayout, its placements with Replicate on mesh axes of size 1) for
    an activation layout, resolved once per layout object, axes, mesh and shape: Keras asks for
    each layer output's layout on every call."""
    axes, keras_mesh = getattr(layout, "axes", None), getattr(layout, "device_mesh", None)
    key = (id(layout), tuple(axes) if axes is not None else None, id(keras_mesh), shape)
    entry = _RESOLVED.get(key)
    if entry is not None and entry[0] is layout and entry[1] is keras_mesh:
        return entry[2], entry[3]
    tl = resolve_layout(layout, shape)
    # A split over a mesh axis of size 1 is no split: say Replicate, which every op accepts
    # (in-place updates of a Shard(0) value, e.g. a sampler writing tokens, have no rule).
    placements = tuple(Replicate() if tl.mesh.size(i) == 1 else p for i, p in enumerate(tl.placements))
    if len(_RESOLVED) >= _MAX_RESOLVED:
        _RESOLVED.clear()
    _RESOLVED[key] = (layout, keras_mesh, tl, placements)  # holds both: their ids stay theirs
    return tl, placements


def distribute_data_input(per_process_batch, layout, batch_dim_name=None):
    """This process's batch as a DTensor laid out as ``layout`` (its batch dim split along its axis).

    With a model-only mesh every rank holds the same full batch: the result is
    replicated. With a batch axis each process already holds its slice, and
    the global batch is the processes' slices in rank order.
    ``batch_dim_name`` is accepted for Keras' signature; ``layout`` says it all.
    ``layout=None`` returns the batch as is.
    """
    if layout is None:
        return per_process_batch
    tl = resolve_layout(layout, tuple(per_process_batch.shape))
    local = torch.as_tensor(per_process_batch).to(local_device(tl.mesh))
    return DTensor.from_local(local, tl.mesh, tl.placements, run_check=False)


def wrap_validate_axes(original):
    """Let a TensorLayout entry name several mesh axes, e.g. ``(("batch", "model"), None)``."""

    def _validate_axes(self):
        if self._device_mesh:
            valid = set(self._device_mesh.axis_names)
            named = {a for e in self._axes if e is not None for a in ((e,) if isinstance(e, str) else e)}
            if named - valid:
                raise ValueError(
                    f"Invalid axis names for Layout. Valid axis names: {valid}, Got {named - valid}. "
                    "Each entry is None, a mesh axis name, or a tuple of mesh axis names."
                )

    return _validate_axes
