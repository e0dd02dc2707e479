"""Fully sharded data parallel along one mesh axis: a weight is whole along it only while used.

A weight split along the data axis (the mesh axis that splits batches) is,
for the few ops that read it, gathered along that axis and along no other
(`gather_for_compute`): the op sees the weight as tensor parallelism alone
would lay it out, the batch stays split, and the gathered block is freed as
soon as the op's caller drops it. Three pieces make the per-rank peak of a
train step about ``2 P/N`` (gradients and optimizer state) plus one or two
gathered blocks plus activations, instead of every gathered weight at once:

* `gather_for_compute(param, axis)`: a differentiable all-gather along mesh
  axis ``axis``. Its backward lays the gradient out exactly like ``param``
  (`relayout`): a gradient that is a sum over the data axis (``Partial``,
  the batch was split) is reduce-scattered, a replicated one is sliced.
* `regather_hooks()`: saved-tensor hooks. An op that saves a gathered
  weight (or a view of one) for its backward saves a small token instead;
  the backward gathers the weight again when it needs it (ZeRO-3 / FSDP2
  re-gather in backward). Without them the autograd graph would keep every
  layer's gathered weight alive from the forward to the backward.
* `relayout(x, placements)`: a redistribution planned one mesh axis at a
  time, reductions and splits first, gathers last, so no intermediate holds
  more than the larger of input and output (DTensor's planner may gather a
  2-D gradient whole first).

Torch only; the Keras integration (`shardimpl.keras.fsdp`) decides which
variables are gathered and when.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from shardimpl.layout import local_shard_bounds
from shardimpl.mesh import mesh_coordinate, mesh_ranks
from shardimpl.reshard import reshard_p2p

__all__ = ["gather_for_compute", "regather_hooks", "local_saves", "relayout", "gathered_placements", "GatherStats",
           "stats", "live_gathered"]


def gathered_placements(placements, axis: int) -> tuple:
    """``placements`` with mesh axis ``axis`` replicated (what the gather produces)."""
    out = list(placements)
    out[axis] = Replicate()
    return tuple(out)


# --- relayout: one mesh axis at a time ---------------------------------------------------


def _p2p_one_axis(x: DTensor, axis: int, target: Shard) -> DTensor | None:
    """Shard(a) -> Shard(b) along mesh axis ``axis`` point to point, when no other axis splits
    a or b (then the move is a 1-D reshard of the local blocks within the axis' group)."""
    src = x.placements[axis]
    others = [p for i, p in enumerate(x.placements) if i != axis]
    if any(isinstance(p, Shard) and p.dim in (src.dim, target.dim) for p in others):
        return None
    mesh = x.device_mesh
    names = mesh.mesh_dim_names
    if names is None:
        return None
    sub = mesh[names[axis]]
    local = x.to_local()
    shape = list(local.shape)
    shape[src.dim] = x.shape[src.dim]
    stride = torch.empty(shape, device="meta").stride()
    one = DTensor.from_local(local, sub, [src], run_check=False, shape=torch.Size(shape), stride=stride)
    moved = reshard_p2p(one, [target]).to_local()
    placements = list(x.placements)
    placements[axis] = target
    return DTensor.from_local(moved, mesh, placements, run_check=False, shape=x.shape, stride=x.stride())


def _keeps_nesting(current, axis: int, target) -> bool:
    new = target[axis]
    if not isinstance(new, Shard):
        return True
    for j, p in enumerate(current):
        if j != axis and isinstance(p, Shard) and p.dim == new.dim and target[j] != p:
            return False
    return True


def relayout(x: DTensor, placements) -> DTensor:
    """``x`` redistributed to ``placements``, one mesh axis at a time (not differentiable).

    Order: axes holding a ``Partial`` first (all-reduce or reduce-scatter),
    then axes that only split (a local slice), then ``Shard(a) -> Shard(b)``
    moves (point to point where no other axis splits those dims), and gathers
    (``-> Replicate``) last; within a group in mesh-axis order, which keeps
    several axes on one dim in DTensor's (mesh-order) nesting. Communication:
    one collective per changed axis. Memory: at no step more than the larger
    of the current and the final local block (plus the collective's output).
    """
    target = tuple(placements)
    if tuple(x.placements) == target:
        return x
    mesh = x.device_mesh
    changes = [i for i, (a, b) in enumerate(zip(x.placements, target)) if a != b]

    def group(i):
        a, b = x.placements[i], target[i]
        if isinstance(a, Partial):
            return 0
        if isinstance(a, Replicate):
            return 1
        if isinstance(b, Shard):
            return 2
        return 3

    pending = sorted(changes, key=lambda i: (group(i), i))
    while pending:
        # Take the first change that does not put two axes on one dim unless the target does
        # (such a nesting would be in the wrong order for DTensor, which then gathers it whole).
        i = next((j for j in pending if _keeps_nesting(x.placements, j, target)), pending[0])
        pending.remove(i)
        a, b = x.placements[i], target[i]
        if isinstance(a, Shard) and isinstance(b, Shard):
            moved = _p2p_one_axis(x, i, b)
            if moved is not None:
                x = moved
                continue
        step = list(x.placements)
        step[i] = b
        x = x.redistribute(mesh, step)
    return x


# --- the differentiable gather ---------------------------------------------------------


@dataclass
class GatherStats:
    """Counts for tests and the planner: gathers in forward, re-gathers in backward."""

    forward: int = 0
    backward: int = 0
    tokens: int = 0
    largest_bytes: int = 0  # the largest gathered block (local bytes on this rank) so far

    def reset(self) -> None:
        self.forward = self.backward = self.tokens = self.largest_bytes = 0

    def _saw(self, t: torch.Tensor) -> None:
        self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())


_REGISTRY: dict = {}  # storage key -> (param, mesh axis, storage offset of the gathered tensor)
_LOCK = threading.Lock()
_STATS = GatherStats()


def stats() -> GatherStats:
    """Process-wide counts of gathers, re-gathers and tokens (tests read them)."""
    return _STATS


def live_gathered() -> int:
    """How many gathered blocks are alive now (0 once the ops that used them returned, when
    the autograd graph holds tokens for them)."""
    with _LOCK:
        return len(_REGISTRY)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _forget(key) -> None:
    with _LOCK:
        _REGISTRY.pop(key, None)


def _gather(param: DTensor, axis: int) -> DTensor:
    """``param`` replicated along mesh axis ``axis``, nothing else changed (no autograd).

    Split evenly on dim 0: one all-gather straight into the output. Otherwise
    an all-gather would land the blocks one after another and need re-stacking
    (a second gathered-size buffer), so each block is broadcast from its owner
    into its slice of the output instead: besides the output, one block.
    """
    mesh = param.device_mesh
    target = gathered_placements(param.placements, axis)
    dim = param.placements[axis].dim
    with torch.no_grad():
        shape, mesh_shape = tuple(param.shape), tuple(mesh.shape)
        coord = list(mesh_coordinate(mesh))
        ranks = mesh_ranks(mesh)  # row-major
        offsets, sizes = local_shard_bounds(shape, mesh_shape, target, coord)
        local = param._local_tensor
        out = torch.empty(sizes, dtype=local.dtype, device=local.device)
        group = mesh.get_group(axis)
        if dim == 0 and sizes[0] == local.shape[0] * mesh.size(axis):  # even: one all-gather in place
            dist.all_gather_single(out, local.contiguous(), group=group)
            return DTensor.from_local(out, mesh, target, run_check=False, shape=param.shape, stride=param.stride())
        for peer in range(mesh.size(axis)):
            coord[axis] = peer
            peer_off, peer_size = local_shard_bounds(shape, mesh_shape, param.placements, coord)
            if peer_size[dim] == 0:
                continue
            src = ranks[_flat_index(coord, mesh_shape)]
            into = out.narrow(dim, peer_off[dim] - offsets[dim], peer_size[dim])
            if peer == mesh_coordinate(mesh)[axis]:
                block = local.contiguous()
                dist.broadcast(block, src=src, group=group)
                into.copy_(block)
            else:
                block = torch.empty(peer_size, dtype=local.dtype, device=local.device)
                dist.broadcast(block, src=src, group=group)
                into.copy_(block)
                del block
        return DTensor.from_local(out, mesh, target, run_check=False, shape=param.shape, stride=param.stride())


def _flat_index(coord, shape) -> int:
    index = 0
    for c, n in zip(coord, shape):
        index = index * int(n) + int(c)
    return index


class _GatherForCompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, axis):
        ctx.layout = tuple(param.placements)
        out = _gather(param, axis)
        _STATS.forward += 1
        _STATS._saw(out._local_tensor)
        return out

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, DTensor):
            grad = relayout(grad, ctx.layout)
        return grad, None


def gather_for_compute(param: DTensor, axis: int) -> DTensor:
    """``param`` all-gathered along mesh axis ``axis`` only; differentiable.

    Communication: one all-gather along ``axis`` (its group only); backward,
    one reduce-scatter of the gradient along ``axis`` when the gradient is a
    sum over it (batches split along it), or a local slice when it is
    replicated; other axes as `relayout` needs. Memory: the gathered block
    (``param``'s local block times the size of ``axis``), held by whoever
    holds the result; under `regather_hooks` the autograd graph holds a token
    instead and gathers again in backward.
    """
    if param.device_mesh.size(axis) == 1 or not isinstance(param.placements[axis], Shard):
        return param
    out = _GatherForCompute.apply(param, axis)
    local = out.to_local()
    key = _storage_key(local)
    if key is not None:
        storage = local.untyped_storage()
        with _LOCK:
            _REGISTRY[key] = (param, axis, local.storage_offset())
        weakref.finalize(storage, _forget, key)
    return out


@dataclass(frozen=True)
class _Token:
    """What a saved gathered weight (or a view of it) becomes: enough to gather it again."""

    param: DTensor
    axis: int
    size: tuple
    stride: tuple
    offset: int  # relative to the gathered tensor's own storage offset
    placements: tuple
    shape: torch.Size
    global_stride: tuple


def is_gathered(t) -> bool:
    """Whether ``t`` is (a view of) a weight gathered along its data axis while its layer runs."""
    return bool(_REGISTRY) and isinstance(t, DTensor) and _storage_key(t._local_tensor) in _REGISTRY


def _pack_gathered(t):
    if not _REGISTRY or not isinstance(t, DTensor):
        return None
    local = t._local_tensor
    entry = _REGISTRY.get(_storage_key(local))
    if entry is None:
        return None
    param, axis, base = entry
    _STATS.tokens += 1
    return _Token(param, axis, tuple(local.size()), tuple(local.stride()), local.storage_offset() - base,
                  tuple(t.placements), t.shape, tuple(t.stride()))


def _unpack(x):
    if not isinstance(x, _Token):
        return x
    _STATS.backward += 1
    whole = _gather(x.param, x.axis).to_local()
    _STATS._saw(whole)
    view = whole.as_strided(x.size, x.stride, whole.storage_offset() + x.offset)
    return DTensor.from_local(view, x.param.device_mesh, x.placements, run_check=False,
                              shape=x.shape, stride=x.global_stride)


@contextlib.contextmanager
def regather_hooks(pack_other=None):
    """Saved-tensor hooks for the block: gathered weights (and their views) saved as tokens.

    ``pack_other(t)``, if given, packs every other saved tensor (one set of
    hooks is active at a time, so a caller with its own packing passes it
    here). Unpacking a token all-gathers the weight again (no autograd
    history; the backward only reads it).
    """
    other = pack_other or (lambda t: t)

    def pack(t):
        token = _pack_gathered(t)
        return token if token is not None else other(t)

    pack._shardimpl_regather = True  # what `local_saves` looks for
    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        yield


def local_saves():
    """Ops run on local blocks inside it save their tensors as they are when the active
    saved-tensor hooks are `regather_hooks`' (whose other-packing would wrap them), and
    under any other hooks (``torch.utils.checkpoint``'s, i.e. ``keras.RematScope``) or none
    leave things as they are, so a rematerialized block keeps only its input.

    Reads torch's private ``_top_saved_tensors_default_hooks`` (torch 2.6-2.13).
    """
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None and getattr(top[0], "_shardimpl_regather", False):
        return torch.autograd.graph.saved_tensors_hooks(_identity, _identity)
    return _NOTHING


_NOTHING = contextlib.nullcontext()


def _identity(t):
    return t
