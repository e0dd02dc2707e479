"""Sharded creation: each rank builds, holds and allocates only its own shard.

`distribute_variable` is the torch counterpart of Keras' backend
``distribute_variable(value, layout)``: it returns a DTensor whose local tensor
is this rank's shard on this rank's device. Three paths, logged at DEBUG:

* ``shard-local``: a Keras built-in initializer, drawn element by element for
  just this shard (see `shardimpl.initializers`);
* ``slice``: a concrete value (torch tensor or numpy array) that the caller
  already holds; only the shard is copied to the device;
* ``fallback``: any other initializer (Orthogonal, a user's callable) builds
  the full tensor once on the CPU, keeps the shard and frees the rest, with a
  one-time warning naming the variable.

A replicated layout takes the same paths with the shard being the whole tensor
(values agree across ranks because seeds do).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Shard

from shardimpl.initializers import fill_local_shard, spec_from_initializer
from shardimpl.layout import (
    TorchLayout,
    describe_placements,
    local_device,
    local_shard_bounds,
    mesh_coordinate,
    resolve_layout,
    shard_slices,
)
from shardimpl.seeds import mix_seed, next_seed

__all__ = ["distribute_variable", "to_torch_dtype"]

logger = logging.getLogger("shardimpl")
_warned_fallback: set = set()


def to_torch_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype, a numpy dtype or a Keras dtype string."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(
            f"Unsupported dtype {dtype!r}. Use a torch dtype or a Keras dtype name such "
            "as 'float32', 'bfloat16', 'int64'."
        )
    return value


def _contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def _is_initializer(value) -> bool:
    if isinstance(value, (str, dict)):
        return True
    from keras import initializers

    return isinstance(value, initializers.Initializer) or (
        callable(value) and not isinstance(value, (torch.Tensor, np.ndarray))
    )


def _fallback_full(init, shape, dtype: torch.dtype, name) -> torch.Tensor:
    """Build the whole tensor once on the CPU with a seed every rank agrees on."""
    import keras

    key = name or f"{type(init).__name__}{tuple(shape)}"
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(
            f"shardimpl: variable {key!r} uses {type(init).__name__}, which has no "
            "shard-local form; its full tensor is built once on the CPU, sliced and freed. "
            "Use a built-in random initializer to avoid the full-size host allocation.",
            stacklevel=4,
        )
    seed = next_seed()
    if getattr(init, "_init_seed", 0) is None and hasattr(init, "get_config"):
        init = type(init).from_config({**init.get_config(), "seed": seed % (2**31)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed))
        with keras.device("cpu"):
            full = init(tuple(shape), dtype=str(dtype).replace("torch.", ""))
    return torch.as_tensor(full).to("cpu", dtype)


def _resolve_value(value, shape, dtype, name):
    """Return (kind, payload, full_shape, torch dtype)."""
    where = f"variable {name!r}" if name else "distribute_variable"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        full_shape = tuple(int(s) for s in value.shape)
        if shape is not None and tuple(shape) != full_shape:
            raise ValueError(
                f"{where}: shape={tuple(shape)} does not match the value's shape "
                f"{full_shape}. Omit shape or pass a value of that shape."
            )
        tdtype = to_torch_dtype(dtype if dtype is not None else value.dtype)
        return "tensor", value, full_shape, tdtype
    if not _is_initializer(value):
        raise TypeError(
            f"{where}: value must be a torch tensor, a numpy array or a Keras initializer. "
            f"Received: {type(value).__name__}."
        )
    if shape is None or dtype is None:
        raise ValueError(
            f"{where}: an initializer needs shape= and dtype= to build a variable. "
            f"Received: shape={shape}, dtype={dtype}. Pass both, e.g. "
            "distribute_variable('glorot_uniform', layout, shape=(1024, 512), dtype='float32')."
        )
    from keras import initializers

    init = initializers.get(value) if isinstance(value, (str, dict)) else value
    return "initializer", init, tuple(int(s) for s in shape), to_torch_dtype(dtype)


def _local_from_tensor(value, offsets, sizes, dtype, device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        piece = np.ascontiguousarray(value[shard_slices(offsets, sizes)])
        return torch.from_numpy(piece).to(device=device, dtype=dtype)
    if value.device.type == "meta":
        # A meta value carries no data: allocate the shard uninitialized, as
        # `Module.to_empty` does; the caller fills it (e.g. set_weights).
        return torch.empty(tuple(sizes), dtype=dtype, device=device)
    piece = value.detach()[shard_slices(offsets, sizes)]
    return piece.to(device=device, dtype=dtype, copy=True).contiguous()


def distribute_variable(value, layout, *, shape=None, dtype=None, name=None) -> DTensor:
    """Create a variable already sharded as ``layout`` says: a DTensor holding this rank's shard.

    Args:
        value: a torch tensor (any device; a ``meta`` tensor gives an
            uninitialized shard), a numpy array, or a Keras initializer
            (instance, name or config); initializers need ``shape`` and ``dtype``.
        layout: a `keras.distribution.TensorLayout` on a `DeviceMesh` whose
            devices are ``"cpu:R"``/``"gpu:R"`` with R the global rank, or a
            `shardimpl.TorchLayout`.
        shape, dtype: the full (global) shape and dtype; for tensors, optional
            checks/casts.
        name: the variable's name or path, used in logs, warnings and errors.

    Memory: allocates only the local shard on this rank's device (``cuda:LOCAL_RANK``
    for CUDA meshes, else CPU); the shard-local path adds at most 1 MiB of
    scratch on the host; the fallback path holds the full tensor
    on the host briefly. Communication: none, except the first time a mesh is
    converted (sub-group creation and one 8-byte seed broadcast).
    """
    kind, payload, full_shape, tdtype = _resolve_value(value, shape, dtype, name)
    tl: TorchLayout = resolve_layout(layout, full_shape, name=name)
    mesh = tl.mesh
    coord = mesh_coordinate(mesh)
    offsets, sizes = local_shard_bounds(full_shape, tuple(mesh.shape), tl.placements, coord)
    device = local_device(mesh)
    if kind == "tensor":
        local = _local_from_tensor(payload, offsets, sizes, tdtype, device)
        path = "slice"
    else:
        spec = spec_from_initializer(payload, full_shape)
        if spec is not None:
            local = fill_local_shard(spec, full_shape, offsets, sizes, dtype=tdtype, device=device)
            path = "shard-local"
        else:
            full = _fallback_full(payload, full_shape, tdtype, name)
            local = full[shard_slices(offsets, sizes)].to(device=device, copy=True).contiguous()
            del full
            path = "fallback"
    if path == "shard-local" and not any(isinstance(p, Shard) for p in tl.placements):
        path = "replicated"
    itemsize = torch.empty((), dtype=tdtype).element_size()
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "distribute_variable name=%s full_shape=%s full_bytes=%d layout=%s "
            "local_shape=%s local_bytes=%d device=%s path=%s",
            name, full_shape, math.prod(full_shape) * itemsize, describe_placements(tl),
            tuple(sizes), math.prod(sizes) * itemsize, device, path,
        )
    return DTensor.from_local(
        local, mesh, tl.placements, run_check=False,
        shape=torch.Size(full_shape), stride=_contiguous_strides(full_shape),
    )
