"""Layout math: which placements a layout means and which block of a tensor each rank owns.

Vocabulary: an *axis* is a mesh axis (``"batch"``, ``"model"``); a *dim* is a
tensor dimension. A layout maps each tensor dim to ``None`` (replicated), one
mesh axis, or a tuple of mesh axes (the dim is split over their product, the
first axis major, as DTensor's ``[Shard(d), Shard(d)]`` does).

Everything here is pure: no process group, no collective, no allocation
(meshes and process groups are `shardimpl.mesh`'s). `local_shard_bounds` is
the single source of truth for which slice of the full tensor a mesh
coordinate owns; it follows `torch.chunk` / DTensor `Shard` (ceil-sized
chunks, trailing chunks smaller or empty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

__all__ = [
    "TorchLayout",
    "axes_to_placements",
    "check_placements",
    "local_shard_bounds",
    "shard_slices",
    "describe_placements",
]


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


def axes_to_placements(axes, axis_names, ndim, where) -> tuple:
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


def check_placements(placements, mesh: DeviceMesh, ndim: int, where: str) -> tuple:
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


def describe_placements(layout: TorchLayout) -> str:
    names = layout.mesh.mesh_dim_names or tuple(f"axis{i}" for i in range(layout.mesh.ndim))
    return "{" + ", ".join(f"{n}: {p}" for n, p in zip(names, layout.placements)) + "}"
