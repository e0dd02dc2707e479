"""Meshes and process groups: Keras device meshes as torch `DeviceMesh`es, layouts resolved on them.

Unlike `shardimpl.layout` (pure arithmetic), this module talks to
``torch.distributed``: converting a mesh creates its sub-groups, and the
first conversion agrees the ranks' base seed (`shardimpl.seeds`). A Keras
`TensorLayout` is read by duck typing (``axes``, ``device_mesh``): nothing
here imports Keras.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from shardimpl.layout import TorchLayout, axes_to_placements, check_placements
from shardimpl.seeds import agree_base_seed, reset_seeds

__all__ = [
    "to_torch_mesh",
    "kept_axes",
    "torch_placements",
    "resolve_layout",
    "mesh_ranks",
    "mesh_coordinate",
    "local_device",
]

_DEVICE_TYPES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
_MESH_CACHE: dict = {}


def _parse_device(device: str, where: str) -> tuple[str, int]:
    kind, sep, index = str(device).partition(":")
    if kind not in _DEVICE_TYPES or not sep or not index.isdigit():
        raise ValueError(
            f"{where}: each mesh device must look like 'cpu:R' or 'gpu:R' where R is "
            f"the global rank that owns it. Received: device={device!r}. Build the mesh "
            "from keras.distribution.list_devices() or name one device per rank."
        )
    return _DEVICE_TYPES[kind], int(index)



def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1



def _check_process_group(mesh_size: int, where: str) -> None:
    if mesh_size > 1 and not dist.is_initialized():
        raise ValueError(
            f"{where}: the device mesh has {mesh_size} devices but no torch.distributed "
            "process group is initialized in this process. Start the ranks with "
            "torchrun or shardimpl.launch.run, or call keras.distribution.initialize() / "
            "torch.distributed.init_process_group() before distributing variables."
        )


def _check_device_type(device_type: str, where: str) -> None:
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{where}: the mesh names 'gpu:R' devices but this torch has no usable CUDA "
            f"device (torch {torch.__version__}, CUDA build: {torch.version.cuda}, "
            f"devices: {torch.cuda.device_count() if torch.version.cuda else 0}). Build the mesh from "
            "keras.distribution.list_devices() (it names 'cpu:R' here), or install a CUDA "
            "build of torch on a machine with a GPU."
        )


def _new_mesh(device_type: str, ranks, shape, names) -> DeviceMesh:
    """A torch DeviceMesh; without a process group (one rank), one that needs none.

    A one-rank mesh never communicates, so it is built without a backend
    (``_init_backend=False, _rank=0``; private DeviceMesh arguments, present in
    torch 2.13) instead of creating a world-1 default process group behind the
    user's back: nothing is left that would block a later
    ``keras.distribution.initialize()`` or ``torch.distributed.init_process_group()``.
    """
    layout = torch.tensor(ranks, dtype=torch.int64).reshape(shape)
    if dist.is_initialized():
        return DeviceMesh(device_type, layout, mesh_dim_names=names)
    try:
        return DeviceMesh(device_type, layout, mesh_dim_names=names, _init_backend=False, _rank=0)
    except TypeError as exc:  # the private arguments moved: say so, never create a group silently
        raise RuntimeError(
            "shardimpl builds one-rank meshes without a process group using torch's private "
            f"DeviceMesh(_init_backend=False, _rank=0) (torch 2.13); this torch ({torch.__version__}) "
            f"refused them: {exc}. Call torch.distributed.init_process_group('gloo', "
            "init_method='tcp://127.0.0.1:0', rank=0, world_size=1) yourself first."
        ) from exc


def _world_key():
    """Identifies the current world: the seed agreed for one world must not serve another."""
    if not dist.is_initialized():
        return None
    return (dist.get_world_size(), id(dist.group.WORLD))


_seed_world: list = []


def _agree_seed_for_this_world(device_type: str) -> None:
    key = _world_key()
    if _seed_world and _seed_world[0] != key:
        reset_seeds()  # a new world (e.g. initialize() after a one-rank mesh): agree afresh
    _seed_world[:] = [key]
    agree_base_seed(device_type)


def kept_axes(keras_mesh) -> tuple:
    """The Keras mesh axes the torch mesh keeps: those of size > 1 (the first axis if none is).

    An axis of size 1 splits nothing, so a (1, N) ("batch", "model") mesh
    becomes a 1-D torch mesh over "model": every placement is the same, and
    DTensor plans each redistribution over one mesh dim instead of searching
    a 2-D space of states (the first step of a keras-hub model on (1, 2) took
    tens of seconds of such planning).
    """
    names, shape = tuple(keras_mesh.axis_names), tuple(int(s) for s in keras_mesh.shape)
    kept = tuple(n for n, s in zip(names, shape) if s > 1)
    return kept or names[:1]


def torch_placements(axes, keras_mesh, ndim: int, where: str) -> tuple:
    """Placements on the torch mesh of a Keras layout's ``axes`` (size-1 axes dropped)."""
    names = list(keras_mesh.axis_names)
    full = axes_to_placements(axes, names, ndim, where)
    return tuple(full[names.index(n)] for n in kept_axes(keras_mesh))


def to_torch_mesh(keras_mesh, *, where: str = "layout") -> DeviceMesh:
    """Convert (and cache) a `keras.distribution.DeviceMesh` to a torch `DeviceMesh`.

    The torch mesh has the Keras mesh's axes of size > 1 only (`kept_axes`);
    layouts naming a size-1 axis are replicated along it, which is the same.

    Device ``"cpu:R"`` / ``"gpu:R"`` means global rank ``R``; ``gpu`` needs a
    CUDA device (checked here, with the fix). A one-device mesh needs no
    process group and creates none (see `_new_mesh`). Collective: on the
    first call for a mesh, torch creates one sub-group per mesh axis (all ranks
    must convert the same meshes in the same order) and the ranks agree on a
    base seed (one broadcast of 8 bytes). Later calls hit the cache.
    """
    devices = [_parse_device(d, where) for d in keras_mesh.devices.reshape(-1).tolist()]
    kinds = {k for k, _ in devices}
    if len(kinds) != 1:
        raise ValueError(
            f"{where}: a mesh must hold one device type. Received: {sorted(kinds)} in "
            f"mesh {keras_mesh}. Use only 'cpu:R' or only 'gpu:R' devices."
        )
    device_type = kinds.pop()
    ranks = [r for _, r in devices]
    shape = tuple(int(s) for s in keras_mesh.shape)
    names = tuple(keras_mesh.axis_names)
    _check_device_type(device_type, where)
    _check_process_group(len(ranks), where)
    world = _world_size()
    if len(ranks) != world or sorted(ranks) != list(range(world)):
        raise ValueError(
            f"{where}: the device mesh must name every rank exactly once: its size must "
            f"equal the world size. Received: mesh shape={shape} with ranks {ranks}, "
            f"world size={world}. Build DeviceMesh(shape, axis_names, "
            "keras.distribution.list_devices()) with prod(shape) == world size."
        )
    key = (device_type, shape, names, tuple(ranks))
    mesh = _MESH_CACHE.get(key)
    if mesh is None:
        kept = kept_axes(keras_mesh)
        kept_shape = tuple(shape[names.index(n)] for n in kept)
        layout = torch.tensor(ranks, dtype=torch.int64).reshape(kept_shape)  # row-major order is kept
        if dist.is_initialized():
            mesh = DeviceMesh(device_type, layout, mesh_dim_names=kept)
        else:
            mesh = DeviceMesh(device_type, layout, mesh_dim_names=kept, _init_backend=False, _rank=0)
        agree_base_seed(device_type)
        _MESH_CACHE[key] = mesh
    return mesh



def resolve_layout(layout, shape: Sequence[int], *, name: str | None = None) -> TorchLayout:
    """Validate ``layout`` against a tensor of ``shape`` and return a `TorchLayout`.

    Accepts a `keras.distribution.TensorLayout` (with its ``device_mesh`` set)
    or a `TorchLayout`. Raises ValueError naming the variable, the layout and
    the fix when they do not fit together.
    """
    shape = tuple(int(s) for s in shape)
    where = f"variable {name!r} (shape={shape})" if name else f"tensor of shape={shape}"
    if isinstance(layout, TorchLayout):
        if layout.mesh.size() != _world_size():
            raise ValueError(
                f"{where}: the mesh size must equal the world size. Received: mesh of "
                f"{layout.mesh.size()} devices, world size={_world_size()}."
            )
        return TorchLayout(layout.mesh, check_placements(layout.placements, layout.mesh, len(shape), where))
    axes = getattr(layout, "axes", None)
    keras_mesh = getattr(layout, "device_mesh", None)
    if axes is None:
        raise TypeError(
            f"{where}: layout must be a keras.distribution.TensorLayout or a "
            f"shardimpl.TorchLayout. Received: {type(layout).__name__}."
        )
    where = f"{where}, layout axes={tuple(axes)}"
    if keras_mesh is None:
        raise ValueError(
            f"{where}: the TensorLayout has no device_mesh. Pass "
            "TensorLayout(axes, device_mesh) or put it in a LayoutMap built on a mesh."
        )
    if len(axes) != len(shape):
        raise ValueError(
            f"{where}: the layout has {len(axes)} entries but the tensor has rank "
            f"{len(shape)}. Give one entry (a mesh axis name or None) per tensor dim."
        )
    placements = torch_placements(axes, keras_mesh, len(shape), where)
    mesh = to_torch_mesh(keras_mesh, where=where)
    return TorchLayout(mesh, placements)



def mesh_ranks(mesh: DeviceMesh) -> list[int]:
    """The mesh's global ranks in row-major order (plain ints; also under FakeTensorMode)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return [int(r) for r in mesh.mesh.reshape(-1).tolist()]



def mesh_coordinate(mesh: DeviceMesh, rank: int | None = None) -> tuple[int, ...]:
    """This rank's (or ``rank``'s) coordinate in ``mesh``; pure lookup, no tensor ops
    (so it also runs under FakeTensorMode)."""
    if rank is None:
        coord = mesh.get_coordinate()
        if coord is not None:
            return tuple(int(c) for c in coord)
        rank = dist.get_rank()
    flat = mesh_ranks(mesh)
    if rank not in flat:
        raise ValueError(f"rank {rank} is not in mesh {mesh}.")
    index, coord = flat.index(rank), []
    for size in reversed(tuple(mesh.shape)):
        coord.append(index % size)
        index //= size
    return tuple(reversed(coord))



def local_device(mesh: DeviceMesh) -> torch.device:
    """Where this rank keeps its shards: ``cuda:LOCAL_RANK`` for CUDA meshes, else CPU."""
    if mesh.device_type == "cuda":
        count = max(torch.cuda.device_count(), 1)
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) % count
        return torch.device("cuda", index)
    return torch.device(mesh.device_type)
