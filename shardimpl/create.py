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
import os
import warnings
import zlib

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Shard

from shardimpl.agree import agree, describe
from shardimpl.initializers import InitSpec, fill_local_shard, spec_from_initializer
from shardimpl.layout import TorchLayout, describe_placements, local_shard_bounds, shard_slices
from shardimpl.mesh import local_device, mesh_coordinate, resolve_layout
from shardimpl.seeds import mix_seed, next_seed

__all__ = ["distribute_variable", "to_torch_dtype", "CHECK_REPLICATED_ENV"]

#: Set to 1 to make every `distribute_variable` call check that its concrete value is the
#: same on every rank (as ``check_replicated=True``); the same on every rank, like the flag.
CHECK_REPLICATED_ENV = "SHARDIMPL_CHECK_REPLICATED"
_CHUNK = 1 << 20  # elements per step of the value checks: bounded temporary memory

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


def _keras_initializers():
    """Keras' initializers module, or None where Keras is not importable (torch-only use)."""
    try:
        from keras import initializers
    except ImportError:
        return None
    return initializers


def _is_initializer(value) -> bool:
    if isinstance(value, (InitSpec, str, dict)):
        return True
    return callable(value) and not isinstance(value, (torch.Tensor, np.ndarray))


def _warn_fallback(init, shape, name) -> None:
    key = name or f"{type(init).__name__}{tuple(shape)}"
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(
            f"shardimpl: variable {key!r} uses {type(init).__name__}, which has no "
            "shard-local form; its full tensor is built once on the CPU, sliced and freed. "
            "Use a built-in random initializer (or a shardimpl.InitSpec) to avoid the "
            "full-size host allocation.",
            stacklevel=5,
        )


def _fallback_full(init, shape, dtype: torch.dtype, name) -> torch.Tensor:
    """Build the whole tensor once on the CPU with a seed every rank agrees on.

    ``init`` is a Keras initializer (called under ``keras.device("cpu")``) or
    any callable ``init(shape, dtype)`` returning a tensor or array.
    """
    _warn_fallback(init, shape, name)
    seed = next_seed()
    if getattr(init, "_init_seed", 0) is None and hasattr(init, "get_config"):
        init = type(init).from_config({**init.get_config(), "seed": seed % (2**31)})
    keras_init = _keras_initializers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed))
        if keras_init is not None and isinstance(init, keras_init.Initializer):
            import keras

            with keras.device("cpu"):
                full = init(tuple(shape), dtype=str(dtype).replace("torch.", ""))
        else:
            full = init(tuple(shape), dtype)
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
            f"{where}: value must be a torch tensor, a numpy array, a shardimpl.InitSpec or "
            f"a Keras initializer. Received: {type(value).__name__}."
        )
    if shape is None or dtype is None:
        raise ValueError(
            f"{where}: an initializer needs shape= and dtype= to build a variable. "
            f"Received: shape={shape}, dtype={dtype}. Pass both, e.g. "
            "distribute_variable('glorot_uniform', layout, shape=(1024, 512), dtype='float32')."
        )
    if isinstance(value, (str, dict)):
        keras_init = _keras_initializers()
        if keras_init is None:
            raise TypeError(
                f"{where}: the initializer {value!r} is a Keras name or config, but Keras is "
                "not importable here. Install keras, or pass a torch tensor, a numpy array "
                "or a shardimpl.InitSpec (e.g. InitSpec('normal', 0.0, 0.02, seed=1))."
            )
        value = keras_init.get(value)
    return "initializer", value, tuple(int(s) for s in shape), to_torch_dtype(dtype)


def _spec_of(init, full_shape):
    """The shard-local form of ``init``: itself if an InitSpec, Keras' built-ins mapped, else None."""
    if isinstance(init, InitSpec):
        return init
    keras_init = _keras_initializers()
    if keras_init is None or not isinstance(init, keras_init.Initializer):
        return None
    return spec_from_initializer(init, full_shape)


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


def _flat_chunks(value):
    """The value's elements in chunks of `_CHUNK` (torch tensors on their device, numpy arrays)."""
    flat = value.reshape(-1)
    for start in range(0, flat.shape[0], _CHUNK):
        yield flat[start:start + _CHUNK]


def _is_float(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f"
    return value.is_floating_point()


def _check_cast(value, dtype: torch.dtype, where: str) -> None:
    """Refuse a float value whose NaN, infinity or out-of-range entries an integer cast would
    silently turn into arbitrary integers (torch gives -2**31 for NaN and 1e10 in int32)."""
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool or not _is_float(value):
        return
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return
    info = torch.iinfo(dtype)
    src = value.dtype
    for chunk in _flat_chunks(value):
        if chunk.shape[0] == 0:
            continue
        if isinstance(chunk, np.ndarray):
            finite, low, high = bool(np.isfinite(chunk).all()), chunk.min(), chunk.max()
        else:
            finite = bool(torch.isfinite(chunk).all())
            low, high = chunk.min().item(), chunk.max().item()
        if not finite:
            raise ValueError(
                f"{where}: a {src} value cast to {dtype} must hold only finite numbers. Received: "
                "a value with NaN or infinity, which has no integer form (the cast would "
                f"silently give {info.min}). Replace them first (e.g. np.nan_to_num) or keep a "
                "floating dtype."
            )
        if low < info.min or high > info.max:
            raise ValueError(
                f"{where}: a {src} value cast to {dtype} must lie in [{info.min}, {info.max}]. "
                f"Received: values in a chunk ranging over [{low}, {high}] (the cast would wrap "
                "them silently). Clip the value, or use a wider dtype (int64) or a floating one."
            )


def _value_checksum(value) -> int:
    """CRC-32 of the value's bytes, read in chunks (a CUDA value is copied to the host chunk by chunk)."""
    crc = 0
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        for chunk in _flat_chunks(value):
            crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
        return crc
    for chunk in _flat_chunks(value.detach()):
        host = chunk.to("cpu").contiguous().view(torch.uint8) if chunk.numel() else chunk
        crc = zlib.crc32(host.numpy().tobytes() if host.numel() else b"", crc)
    return crc


def _check_same_everywhere(value, dtype, where) -> None:
    """The value's checks on every rank at once: a cast problem or differing bytes raise everywhere."""
    problem = error = None
    crc = 0
    try:
        _check_cast(value, dtype, where)
        if not (isinstance(value, torch.Tensor) and value.device.type == "meta"):
            crc = _value_checksum(value)
    except Exception as exc:
        problem, error = describe(exc), exc
    agree(problem, where=f"{where} (check_replicated)", error=error, values=(crc,),
          names=("the CRC-32 of the value's bytes",),
          mismatch=("every rank must pass the same full value (each keeps its slice, so differing "
                    "values would silently give a variable stitched from different arrays, or "
                    "replicas that disagree). Seed the RNG that made it identically on every rank, "
                    "or broadcast it from rank 0 (torch.distributed.broadcast) before distributing."))


def _checks_on(flag) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get(CHECK_REPLICATED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def distribute_variable(value, layout, *, shape=None, dtype=None, name=None,
                        check_replicated=None) -> DTensor:
    """Create a variable already sharded as ``layout`` says: a DTensor holding this rank's shard.

    Args:
        value: a torch tensor (any device; a ``meta`` tensor gives an
            uninitialized shard), a numpy array, a `shardimpl.InitSpec`, a
            Keras initializer (instance, name or config; needs Keras), or any
            callable ``init(shape, dtype)`` (built whole, then sliced);
            initializers need ``shape`` and ``dtype``.
        layout: a `keras.distribution.TensorLayout` on a `DeviceMesh` whose
            devices are ``"cpu:R"``/``"gpu:R"`` with R the global rank, or a
            `shardimpl.TorchLayout`.
        shape, dtype: the full (global) shape and dtype; for tensors, optional
            checks/casts.
        name: the variable's name or path, used in logs, warnings and errors.
        check_replicated: True checks that the full value is the same on every
            rank (CRC-32 of its bytes, compared with one all-reduce) and raises
            ValueError on every rank if not; None reads ``SHARDIMPL_CHECK_REPLICATED``
            (default off). Applies to concrete values and the fallback path;
            shard-local initializer draws agree by construction (agreed seeds).
            Every rank must pass the same flag: the check is collective.

    A float value cast to an integer dtype must be finite and in range
    (ValueError otherwise, checked on the full value, so every rank that holds
    the same value raises).

    Memory: allocates only the local shard on this rank's device (``cuda:LOCAL_RANK``
    for CUDA meshes, else CPU); the shard-local path adds at most 1 MiB of
    scratch on the host; the fallback path holds the full tensor
    on the host briefly; the value checks read the value in 2**20-element chunks.
    Communication: none, except the first time a mesh is converted (sub-group
    creation and one 8-byte seed broadcast) and, with ``check_replicated``, one
    72-byte all-reduce.
    """
    kind, payload, full_shape, tdtype = _resolve_value(value, shape, dtype, name)
    where = f"variable {name!r}" if name else "distribute_variable"
    check = _checks_on(check_replicated)
    if kind == "tensor" and not check:
        _check_cast(payload, tdtype, where)
    tl: TorchLayout = resolve_layout(layout, full_shape, name=name)
    mesh = tl.mesh
    coord = mesh_coordinate(mesh)
    offsets, sizes = local_shard_bounds(full_shape, tuple(mesh.shape), tl.placements, coord)
    device = local_device(mesh)
    if kind == "tensor":
        if check:
            _check_same_everywhere(payload, tdtype, where)
        local = _local_from_tensor(payload, offsets, sizes, tdtype, device)
        path = "slice"
    else:
        spec = _spec_of(payload, full_shape)
        if spec is not None:
            local = fill_local_shard(spec, full_shape, offsets, sizes, dtype=tdtype, device=device)
            path = "shard-local"
        else:
            full = _fallback_full(payload, full_shape, tdtype, name)
            if check:
                _check_same_everywhere(full, tdtype, where)
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
