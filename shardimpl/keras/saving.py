"""Full arrays out of sharded variables, sharded variables from full arrays, and saving.

* ``convert_to_numpy`` (``get_weights``, ``variable.numpy()``, predict outputs):
  a DTensor is gathered to host memory, one variable at a time
  (`all_gather_variable`, every rank gets the array). While saving, only
  rank 0 gathers (``dst=0``); the others get an empty placeholder.
* ``assign`` (``set_weights``, ``load_weights``): a full value is resharded by
  keeping this rank's slice; nothing of full size reaches the device.
* ``save_weights`` / ``model.save`` (``.keras`` and legacy ``.h5``): every
  rank walks the model (the gathers are collective); rank 0 writes to a
  temporary file next to the target and renames it after every rank finished,
  so a failing rank leaves no partial file; the other ranks write their
  placeholders to a private temporary folder that is removed. A failure on
  one rank raises on every rank (`atomic_save`). The result is an ordinary
  Keras file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from shardimpl.agree import agree, describe, during, was_agreed
from shardimpl.gather import gather_variable
from shardimpl.keras.active import current_distribution
from shardimpl.keras.compat import torch_core
from shardimpl.layout import local_shard_bounds, shard_slices
from shardimpl.mesh import mesh_coordinate

__all__ = [
    "saving_scope", "last_save_wrote", "wrap_convert_to_numpy", "wrap_direct_assign",
    "wrap_convert_to_tensor", "atomic_save", "convert_to_numpy_owners",
]

_state = {"saving": False, "wrote": None}


def last_save_wrote():
    """Whether this rank wrote the file of the last sharded save (rank 0: True; others: False)."""
    return _state["wrote"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def saving_scope():
    saved = _state["saving"]
    _state["saving"] = True
    try:
        yield
    finally:
        _state["saving"] = saved


def _full_host_tensor(x: DTensor):
    # Partial / _StridedShard placements are gathered right by gather_variable, after its agreement.
    replicated = all(isinstance(p, Replicate) for p in x.placements)
    # Replicated values are whole on every rank already (configs read them while saving).
    dst = 0 if _state["saving"] and not replicated else None
    return gather_variable(x.detach(), device="cpu", dst=dst)


def wrap_convert_to_numpy(original):
    """Wrap Keras' torch ``convert_to_numpy`` so DTensors come back as full host arrays."""

    @functools.wraps(original)
    def convert_to_numpy(x):
        if isinstance(x, (list, tuple)):
            return np.array([convert_to_numpy(e) for e in x])
        if isinstance(x, DTensor):
            full = _full_host_tensor(x)
            if full is None:  # a non-zero rank while saving: rank 0 writes the file
                return np.zeros((0,), dtype=original(torch.zeros((), dtype=x.dtype)).dtype)
            x = full
        return original(x)

    return convert_to_numpy


def wrap_direct_assign(original):
    @functools.wraps(original)
    def _direct_assign(self, value):
        target = getattr(self, "_value", None)
        if not isinstance(target, DTensor):
            if isinstance(value, DTensor):  # e.g. a metric's plain total updated from sharded outputs
                value = value.full_tensor()
            return original(self, value)
        if isinstance(value, DTensor):
            if tuple(value.placements) != tuple(target.placements):
                value = value.redistribute(target.device_mesh, target.placements)
            with torch.no_grad():
                target.copy_(value.detach())
            return
        full = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if tuple(full.shape) != tuple(target.shape):
            raise ValueError(
                f"Cannot assign a value of shape {tuple(full.shape)} to variable {self.path!r} of "
                f"shape {tuple(target.shape)}. Pass an array of the variable's full (global) shape."
            )
        mesh = target.device_mesh
        offsets, sizes = local_shard_bounds(tuple(target.shape), tuple(mesh.shape), target.placements,
                                            mesh_coordinate(mesh))
        piece = full[shard_slices(offsets, sizes)]
        with torch.no_grad():
            target.to_local().copy_(piece)

    return _direct_assign


def wrap_convert_to_tensor(original):
    @functools.wraps(original)
    def _convert_to_tensor(self, value, dtype=None):
        if isinstance(getattr(self, "_value", None), DTensor) and not isinstance(value, torch.Tensor):
            # A full value for a sharded variable stays on the host; assign keeps a slice.
            to_torch_dtype = torch_core().to_torch_dtype

            array = np.asarray(value)
            return torch.as_tensor(array, dtype=to_torch_dtype(dtype or self.dtype))
        return original(self, value, dtype=dtype)

    return _convert_to_tensor


def atomic_save(original):
    """Wrap a Keras writer (``save_model``, ``save_weights_only``, legacy ``save_model_to_hdf5``)
    so that under a distribution rank 0 writes the file once and every rank ends together.

    Every rank walks the model (the gathers are collective) writing to a private
    temporary folder (rank 0: next to the target; the others: the system's
    temporary folder, placeholders only); once every rank finished, rank 0
    renames its file onto the target. A failure on any rank, anywhere, raises on
    every rank within one gather: the failing rank reports it at the others'
    next agreement point (each gather starts with one, see `shardimpl.agree`)
    instead of leaving them blocked in a gather. The private folders are
    removed on every rank in every case; the target is untouched on failure.
    """

    @functools.wraps(original)
    def save(model, filepath, *args, **kwargs):
        if current_distribution() is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return original(model, filepath, *args, **kwargs)
        where = f"saving {filepath!r}"
        rank = _rank()
        private = None
        _state["wrote"] = False
        try:
            if not isinstance(filepath, (str, os.PathLike)):
                raise TypeError(
                    f"{where}: under a distribution a model is saved to a file path (rank 0 writes "
                    f"it once every rank gathered). Received: filepath of type "
                    f"{type(filepath).__name__}. Pass a path such as 'model.keras'."
                )
            filepath = os.fspath(filepath)
            folder = os.path.dirname(os.path.abspath(filepath))
            if rank == 0:
                os.makedirs(folder, exist_ok=True)
                private = tempfile.mkdtemp(prefix=".shardimpl-save-", dir=folder)
            else:
                private = tempfile.mkdtemp(prefix="shardimpl-save-")
            with saving_scope(), during(where):
                original(model, os.path.join(private, os.path.basename(filepath)), *args, **kwargs)
            agree(None, where=where)  # every rank walked the whole model
            problem = error = None
            if rank == 0:
                try:
                    os.replace(os.path.join(private, os.path.basename(filepath)), filepath)
                except Exception as exc:
                    problem, error = describe(exc), exc
            agree(problem, where=where, error=error)
            _state["wrote"] = rank == 0
        except BaseException as exc:
            if not was_agreed(exc):
                # This rank alone failed: meet the others at their next agreement point
                # (a gather's, or the end of the walk) so they raise too, then raise ours.
                try:
                    agree(describe(exc), where=where, error=exc)
                except BaseException:
                    pass
            raise
        finally:
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)

    return save


def convert_to_numpy_owners():
    """Every loaded Keras module that holds the torch backend's own ``convert_to_numpy``."""
    import sys

    original = torch_core().convert_to_numpy
    return [
        mod for name, mod in list(sys.modules.items())
        if name.startswith("keras") and mod is not None and getattr(mod, "convert_to_numpy", None) is original
    ]
