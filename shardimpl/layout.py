"""Layout conversion: Keras `TensorLayout` -> torch `DeviceMesh` + DTensor placements.

Vocabulary: an *axis* is a mesh axis (``"batch"``, ``"model"``); a *dim* is a
tensor dimension. A layout maps each tensor dim to ``None`` (replicated), one
mesh axis, or a tuple of mesh axes (the dim is split over their product, the
first axis major, as DTensor's ``[Shard(d), Shard(d)]`` does).

Everything here except `to_torch_mesh` is pure: no collectives, no allocation.
`local_shard_bounds` is the single source of truth for which slice of the full
tensor a mesh coordinate owns; it follows `torch.chunk` / DTensor `Shard`
(ceil-sized chunks, trailing chunks smaller or empty).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

__all__ = [
    "TorchLayout",
    "resolve_layout",
    "to_torch_mesh",
    "local_shard_bounds",
    "mesh_coordinate",
    "describe_placements",
]

_DEVICE_TYPES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
_MESH_CACHE: dict = {}


@dataclass(frozen=True)
class TorchLayout:
    """The torch-level layout: a torch `DeviceMesh` and one placement per mesh axis.

    ``placements[m]`` is ``Shard(d)`` (tensor dim ``d`` split over mesh axis
    ``m``) or ``Replicate()``. Several mesh axes may shard the same dim; they
    split it in mesh-axis order. This is exactly DTensor's vocabulary, so a
    `TorchLayout` can describe any layout a Keras `TensorLayout` can.
    """

    mesh: DeviceMesh
    placements: tuple

    def __post_init__(self):
        object.__setattr__(self, "placements", tuple(self.placements))

    @property
    def device_mesh(self) -> DeviceMesh:
        """Alias of ``mesh`` (the name DTensor and Keras' backend layouts use)."""
        return self.mesh


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


def _ensure_process_group(mesh_size: int, where: str) -> None:
    """A one-device mesh may run without a process group: make a private one."""
    if dist.is_initialized():
        return
    if mesh_size > 1:
        raise ValueError(
            f"{where}: the device mesh has {mesh_size} devices but no torch.distributed "
            "process group is initialized in this process. Start the ranks with "
            "torchrun or shardimpl.launch.run, or call keras.distribution.initialize() / "
            "torch.distributed.init_process_group() before distributing variables."
        )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def to_torch_mesh(keras_mesh, *, where: str = "layout") -> DeviceMesh:
    """Convert (and cache) a `keras.distribution.DeviceMesh` to a torch `DeviceMesh`.

    Device ``"cpu:R"`` / ``"gpu:R"`` means global rank ``R``. Collective: on the
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
    _ensure_process_group(len(ranks), where)
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
        mesh = DeviceMesh(
            device_type,
            torch.tensor(ranks, dtype=torch.int64).reshape(shape),
            mesh_dim_names=names,
        )
        from shardimpl.seeds import agree_base_seed

        agree_base_seed(device_type)
        _MESH_CACHE[key] = mesh
    return mesh


def _axes_to_placements(axes, axis_names, ndim, where) -> tuple:
    placements = [Replicate() for _ in axis_names]
    used = {}
    for dim, entry in enumerate(axes):
        if entry is None:
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        mesh_dims = []
        for name in names:
            if name not in axis_names:
                raise ValueError(
                    f"{where}: tensor dim {dim} is sharded over mesh axis {name!r}, which "
                    f"the mesh does not have. Received: axes={tuple(axes)}, mesh "
                    f"axis_names={tuple(axis_names)}. Use one of {tuple(axis_names)} or None."
                )
            if name in used:
                raise ValueError(
                    f"{where}: mesh axis {name!r} shards two tensor dims ({used[name]} and "
                    f"{dim}); a mesh axis can split at most one dim. Received: "
                    f"axes={tuple(axes)}. Replicate one of them (None) or use another axis."
                )
            used[name] = dim
            mesh_dims.append(axis_names.index(name))
        if mesh_dims != sorted(mesh_dims):
            raise ValueError(
                f"{where}: tensor dim {dim} is split over mesh axes {names} out of mesh "
                f"order {tuple(axis_names)}; the first listed axis must come first in the "
                f"mesh. Received: axes={tuple(axes)}. Reorder the tuple to mesh order."
            )
        for m in mesh_dims:
            placements[m] = Shard(dim)
    return tuple(placements)


def _check_placements(placements, mesh: DeviceMesh, ndim: int, where: str) -> tuple:
    if len(placements) != mesh.ndim:
        raise ValueError(
            f"{where}: a TorchLayout needs one placement per mesh axis. Received: "
            f"{len(placements)} placements for a {mesh.ndim}-axis mesh."
        )
    out = []
    for p in placements:
        if isinstance(p, Shard):
            dim = p.dim + ndim if p.dim < 0 else p.dim
            if not 0 <= dim < ndim:
                raise ValueError(
                    f"{where}: placement {p} names a dim outside a tensor of rank {ndim}. "
                    "Use Shard(d) with 0 <= d < rank."
                )
            out.append(Shard(dim))
        elif isinstance(p, Replicate):
            out.append(p)
        else:
            raise ValueError(
                f"{where}: only Shard(d) and Replicate() can lay out a variable. "
                f"Received: {p}."
            )
    return tuple(out)


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
        return TorchLayout(layout.mesh, _check_placements(layout.placements, layout.mesh, len(shape), where))
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
    names = list(keras_mesh.axis_names)
    placements = _axes_to_placements(axes, names, len(shape), where)
    mesh = to_torch_mesh(keras_mesh, where=where)
    return TorchLayout(mesh, placements)


def local_shard_bounds(shape, mesh_shape, placements, coordinate):
    """Offsets and sizes of the block of a ``shape`` tensor owned by ``coordinate``.

    Pure arithmetic, identical to DTensor's `Shard`: each mesh axis that
    shards dim ``d`` cuts the current extent into ``ceil(n / k)``-sized chunks
    in mesh-axis order; chunks past the end are empty (offset = the end).
    """
    offsets = [0] * len(shape)
    sizes = [int(s) for s in shape]
    for m, placement in enumerate(placements):
        if not isinstance(placement, Shard):
            continue
        d, k, c = placement.dim, int(mesh_shape[m]), int(coordinate[m])
        chunk = math.ceil(sizes[d] / k) if sizes[d] else 0
        start = min(c * chunk, sizes[d])
        offsets[d] += start
        sizes[d] = max(0, min(chunk, sizes[d] - start))
    return tuple(offsets), tuple(sizes)


def shard_slices(offsets, sizes) -> tuple:
    """The index of a shard: ``full[shard_slices(offsets, sizes)]`` is that shard's view."""
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


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


def describe_placements(layout: TorchLayout) -> str:
    names = layout.mesh.mesh_dim_names or tuple(f"axis{i}" for i in range(layout.mesh.ndim))
    return "{" + ", ".join(f"{n}: {p}" for n, p in zip(names, layout.placements)) + "}"


def local_device(mesh: DeviceMesh) -> torch.device:
    """Where this rank keeps its shards: ``cuda:LOCAL_RANK`` for CUDA meshes, else CPU."""
    if mesh.device_type == "cuda":
        count = max(torch.cuda.device_count(), 1)
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())) % count
        return torch.device("cuda", index)
    return torch.device(mesh.device_type)
