"""Sharded checkpoints with torch.distributed.checkpoint: each rank writes only its shards.

`save_sharded(model, path)` writes every model variable (``model`` is a Keras
model, or for torch users a plain ``{name: tensor or DTensor}`` dict) (and, with
``optimizer=True``, the optimizer's variables) with DCP: no gather, no rank
ever holds a full variable. The checkpoint is written to a sibling temporary
folder and swapped into place only after every rank finished, so a rank that
fails mid-save leaves the previous checkpoint at ``path`` loadable.

`load_sharded(model, path)` reads into the model's current variables,
whatever their layout: a checkpoint saved at N = 2 loads at N = 4 (DCP
reshards) and into an unsharded model in one process.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

__all__ = ["save_sharded", "load_sharded", "state_dict_of"]


class _TensorSlot:
    """A dict entry seen as a variable (``path``, ``value``, ``assign``): torch users' state dicts."""

    def __init__(self, state: dict, key: str):
        self._state, self.path = state, key

    @property
    def value(self):
        return self._state[self.path]

    def assign(self, new) -> None:
        self._state[self.path].copy_(new)


def _variables(model, optimizer: bool):
    if isinstance(model, Mapping):
        for key, value in model.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"a state dict for save_sharded/load_sharded maps names to tensors or DTensors. "
                    f"Received: {key!r} -> {type(value).__name__}."
                )
        return [_TensorSlot(model, str(key)) for key in model]
    out = list(model.weights)
    if optimizer and getattr(model, "optimizer", None) is not None:
        out += list(model.optimizer.variables)
    return out


def state_dict_of(model, *, optimizer: bool = False) -> dict:
    """{variable path: its torch value (a DTensor when sharded)}, the unit DCP reads and writes.

    ``model`` is a Keras model or a ``{name: tensor}`` dict (returned detached).
    """
    sd = {}
    for v in _variables(model, optimizer):
        if v.path in sd:
            raise ValueError(f"two variables share the path {v.path!r}; give the layers unique names.")
        sd[v.path] = v.value.detach() if isinstance(v.value, torch.Tensor) else v.value
    return sd


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_str(text: str) -> str:
    box = [text]
    if _distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(model, path, *, optimizer: bool = False) -> None:
    """Write ``model``'s variables as a DCP checkpoint at ``path``; each rank writes its own shards.

    Collective (every rank calls it). Memory: no full variable anywhere; DCP
    stages each shard to host memory as it writes it.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = _broadcast_str(os.path.join(parent, f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}"))
    sd = state_dict_of(model, optimizer=optimizer)
    try:
        dcp.save(sd, checkpoint_id=partial, no_dist=not _distributed())
    except BaseException:
        if not _distributed() or dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if _distributed():
        dist.barrier()
    if not _distributed() or dist.get_rank() == 0:
        _swap_into_place(partial, path)
    if _distributed():
        dist.barrier()


def _swap_into_place(partial: str, path: str) -> None:
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(partial, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def load_sharded(model, path, *, optimizer: bool = False) -> None:
    """Read the checkpoint at ``path`` into ``model``'s variables, resharding as needed.

    Collective under a process group. Each rank reads only the parts of the
    saved shards that overlap its own shards.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"no sharded checkpoint at {path!r}: save one with shardimpl.save_sharded(model, path).")
    sd = {}
    targets = {}
    for v in _variables(model, optimizer):
        value = v.value
        if isinstance(value, DTensor):
            buf = torch.empty_like(value.detach())
        else:
            buf = torch.empty(tuple(value.shape), dtype=value.dtype, device="cpu")
        sd[v.path] = buf
        targets[v.path] = v
    dcp.load(sd, checkpoint_id=path, no_dist=not _distributed())
    with torch.no_grad():
        for name, buf in sd.items():
            value = targets[name].value
            if isinstance(value, DTensor):
                value.to_local().copy_(buf.to_local())
            else:
                targets[name].assign(buf)
