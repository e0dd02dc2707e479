"""Sharded checkpoints with torch.distributed.checkpoint: each rank writes only its shards.

`save_sharded(model, path)` writes every model variable (``model`` is a Keras
model, or for torch users a plain ``{name: tensor or DTensor}`` dict) (and, with
``optimizer=True``, the optimizer's variables) with DCP: no gather, no rank
ever holds a full variable.

`load_sharded(model, path)` reads into the model's current variables,
whatever their layout: a checkpoint saved at N = 2 loads at N = 4 (DCP
reshards) and into an unsharded model in one process.

The on-disk scheme: ``path`` always resolves to a complete checkpoint.
``path`` is a symbolic link to a sibling version folder
``.<name>.v-<id>``. A save writes ``.<name>.partial-<id>``, and once every
rank finished (agreed) rank 0 renames it to ``.<name>.v-<id>`` (a complete
version), points a new link ``.<name>.link-<id>`` at it and renames that link
over ``path`` (one atomic rename). The previous version is removed after the
swap; a crash at any point leaves ``path`` on the previous or the new complete
version, and the next save removes what the crash left (``.<name>.partial-*``,
``.v-*``, ``.link-*``, ``.old-*``). A checkpoint saved by an older shardimpl
(``path`` a plain folder) loads as before; saving over it exchanges it with
the link atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
renames, with the old folder kept as ``.<name>.old-<id>`` until the link is in
place). Concurrent saves to the same ``path`` are not supported.

Failures: every rank checks its part before each collective step and the
ranks agree (`shardimpl.agree`), so a failure on any rank (an invalid model,
a write error, a failed swap on rank 0) raises on every rank within one step,
and the partial version is removed (by every rank, where each node has its
own folder).

Several nodes: ``path`` must be on a filesystem every node mounts at the same
path (NFS, Lustre, GPFS, ...). After DCP's write every rank checks that it
sees every file the checkpoint lists (DCP's ``.metadata`` names each rank's
``__R_N.distcp``), before anything is committed: on node-local disks (each
node its own folder at ``path``) rank 0 would otherwise commit a checkpoint
holding only its own node's shards, which no world can load. Every rank then
raises ValueError saying which files it does not see and that a shared
filesystem is needed; ``path`` keeps the previous checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from shardimpl.agree import agree, checksum, describe

__all__ = ["save_sharded", "load_sharded", "state_dict_of"]

_VISIBLE_WAIT_SECONDS = 3.0  # a shared filesystem's attribute cache may hide a new file briefly


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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast_str(text: str) -> str:
    box = [text]
    if _distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _sibling(path: str, kind: str, ident: str) -> str:
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}{kind}{ident}")


def _check_target(path: str, where: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(
            f"{where}: path must be a new name, a checkpoint folder or a link to one. Received: "
            f"{path!r}, which exists and is {'a dangling link' if os.path.islink(path) else 'a file'}. "
            "Pass another path, or remove it first."
        )


def save_sharded(model, path, *, optimizer: bool = False) -> None:
    """Write ``model``'s variables as a DCP checkpoint at ``path``; each rank writes its own shards.

    Collective (every rank calls it, with the same model and path). ``path``
    holds the previous complete checkpoint until the new one is complete and
    swapped in atomically (see the module docstring for the scheme). Memory:
    no full variable anywhere; DCP stages each shard to host memory as it
    writes it. Communication: three 72-byte agreements, one broadcast of the
    version name, and DCP's own collectives.
    """
    path = os.path.abspath(os.fspath(path))
    where = f"save_sharded({path!r})"
    problem = error = sd = None
    try:
        sd = state_dict_of(model, optimizer=optimizer)
        _check_target(path, where)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except Exception as exc:
        problem, error = describe(exc), exc
    layout = checksum(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in (sd or {}).items()))
    agree(problem, where=where, error=error, values=(layout,),
          names=("the checksum of the variables' (name, shape, dtype)",),
          mismatch="every rank must save the same variables (the same model, built the same way).")
    ident = _broadcast_str(uuid.uuid4().hex[:12])
    partial = _sibling(path, ".partial-", ident)
    committed = False
    try:
        problem = error = None
        try:
            metadata = dcp.save(sd, checkpoint_id=partial, no_dist=not _distributed())
            _check_every_file_visible(partial, metadata, path, where)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            problem, error = describe(exc), exc
        agree(problem, where=where, error=error)
        problem = error = None
        if _rank() == 0:
            try:
                _commit(partial, path, ident)
                committed = True
            except Exception as exc:
                problem, error = describe(exc), exc
        agree(problem, where=where, error=error)
    except BaseException:
        if _rank() == 0 and not committed:
            _roll_back(path, ident)
        elif not committed:
            _remove(partial)  # where each node has its own folder, its own partial stays otherwise
        raise
    if _rank() == 0:
        _remove_stale(path, keep=os.path.realpath(path))


def _expected_files(metadata) -> dict[str, int]:
    """{file name: bytes it must hold at least} for every file DCP's metadata points into."""
    sizes = {".metadata": 1}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if name:
            sizes[name] = max(sizes.get(name, 0), int(info.offset) + int(info.length))
    return sizes


def _not_visible(folder: str, expected: dict[str, int]) -> list[str]:
    out = []
    for name, size in sorted(expected.items()):
        try:
            if os.path.getsize(os.path.join(folder, name)) >= size:
                continue
        except OSError:
            pass
        out.append(name)
    return out


def _check_every_file_visible(partial: str, metadata, path: str, where: str) -> None:
    """Raise unless this rank sees every file of the checkpoint just written (see the module
    docstring: node-local disks). Waits up to `_VISIBLE_WAIT_SECONDS` for a slow filesystem."""
    expected = _expected_files(metadata)
    deadline = time.monotonic() + _VISIBLE_WAIT_SECONDS
    missing = _not_visible(partial, expected)
    while missing and time.monotonic() < deadline:
        time.sleep(0.2)
        missing = _not_visible(partial, expected)
    if not missing:
        return
    writers = sorted({int(m.group(1)) for m in (re.match(r"__(\d+)_", n) for n in missing) if m})
    by = f" (written by rank(s) {writers})" if writers else ""
    raise ValueError(
        f"{where}: every rank must see every rank's checkpoint files, so path must be on a "
        "filesystem shared by all nodes at the same path (NFS, Lustre, GPFS, ...). Received: rank "
        f"{_rank()} on {socket.gethostname()} does not see {missing}{by} in {partial} after "
        f"{_VISIBLE_WAIT_SECONDS:g} s: each node has its own folder at {path} (node-local disks). "
        "Nothing was committed; path keeps the previous checkpoint. Save to a shared filesystem "
        "(the same path on every node)."
    )


def _commit(partial: str, path: str, ident: str) -> None:
    """Rank 0: make ``partial`` the checkpoint at ``path`` in one atomic step."""
    version = _sibling(path, ".v-", ident)
    os.rename(partial, version)  # complete: every rank agreed that its writes finished
    link = _sibling(path, ".link-", ident)
    os.symlink(os.path.basename(version), link)  # relative: the folder may be mounted elsewhere
    if os.path.islink(path) or not os.path.lexists(path):
        os.replace(link, path)  # atomic: path is the old version, then the new one
    else:  # a plain checkpoint folder from an older shardimpl
        if not _exchange(link, path):
            old = _sibling(path, ".old-", ident)
            os.rename(path, old)  # the one non-atomic window where renameat2 is missing
            os.rename(link, path)
    _fsync_dir(os.path.dirname(path))


def _roll_back(path: str, ident: str) -> None:
    """Rank 0 after a failed save: path as it was, this save's names gone."""
    old = _sibling(path, ".old-", ident)
    if os.path.isdir(old) and not os.path.lexists(path):
        os.rename(old, path)  # the two-rename fallback failed between its renames
    for kind in (".partial-", ".v-", ".link-"):
        _remove(_sibling(path, kind, ident))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two names (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        return False
    return True


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(name: str) -> None:
    if os.path.islink(name) or os.path.isfile(name):
        try:
            os.unlink(name)
        except OSError:
            pass
    elif os.path.isdir(name):
        shutil.rmtree(name, ignore_errors=True)


def _remove_stale(path: str, keep: str) -> None:
    """Remove every version, partial, link or old folder of ``path`` but the one it points at."""
    parent, base = os.path.split(path)
    ours = re.compile(rf"^\.{re.escape(base)}\.(partial|v|link|old)-[0-9a-f]{{12}}$")
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        full = os.path.join(parent, name)
        if ours.match(name) and os.path.realpath(full) != keep:
            _remove(full)


def load_sharded(model, path, *, optimizer: bool = False) -> None:
    """Read the checkpoint at ``path`` into ``model``'s variables, resharding as needed.

    Collective under a process group (every rank calls it). Each rank reads
    only the parts of the saved shards that overlap its own shards. ``path`` is
    resolved once (a link to a version, or a plain checkpoint folder) and the
    ranks agree that they read the same version, so a save swapping ``path``
    meanwhile cannot mix two versions. Communication: one 72-byte agreement
    and DCP's own collectives.
    """
    path = os.path.abspath(os.fspath(path))
    where = f"load_sharded({path!r})"
    problem = error = None
    real = ""
    sd, targets = {}, {}
    try:
        if not os.path.isdir(path):
            raise ValueError(
                f"{where}: path must be a checkpoint written by shardimpl.save_sharded. Received: "
                f"{path!r}, which {'is not a folder' if os.path.lexists(path) else 'does not exist'}. "
                "Save one with shardimpl.save_sharded(model, path) or check the path."
            )
        real = os.path.realpath(path)
        if not os.path.isfile(os.path.join(real, ".metadata")):
            raise ValueError(
                f"{where}: a checkpoint folder must hold DCP's .metadata (written last, when a save "
                f"completes). Received: {real!r} without it: an incomplete or foreign folder. "
                "Save again with shardimpl.save_sharded."
            )
        for v in _variables(model, optimizer):
            value = v.value
            if isinstance(value, DTensor):
                buf = torch.empty_like(value.detach())
            else:
                buf = torch.empty(tuple(value.shape), dtype=value.dtype, device="cpu")
            sd[v.path] = buf
            targets[v.path] = v
    except Exception as exc:
        problem, error = describe(exc), exc
    agree(problem, where=where, error=error, values=(checksum(os.path.basename(real)),),
          names=("the checksum of the version read",),
          mismatch=("every rank must read the same checkpoint version; a save replaced it while "
                    "the ranks resolved it (or they see different folders). Load again after the save."))
    dcp.load(sd, checkpoint_id=real, no_dist=not _distributed())
    with torch.no_grad():
        for name, buf in sd.items():
            value = targets[name].value
            if isinstance(value, DTensor):
                value.to_local().copy_(buf.to_local())
            else:
                targets[name].assign(buf)
