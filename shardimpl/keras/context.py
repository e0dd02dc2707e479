"""The context shardimpl runs Keras code in: one flag for "inside shardimpl", one for the ops.

`within_shardimpl()` marks a block that already runs under shardimpl's
context (a trainer step, an outermost direct call), so nested layer calls
do not enter it again and return DTensors to their caller. `step_context()`
lets plain tensors mix with DTensors (treated as replicated), sends
attention through decomposable math ops (DTensor has no rule for the fused
CPU/flash attention backward) and saves gathered weights for backward as
re-gather tokens (`shardimpl.fsdp.regather_hooks`). `in_layer_call()` is
true while a layer's ``call`` runs inside that context: only there does a
variable split along the data axis read as gathered (`shardimpl.keras.fsdp`),
never in the optimizer or when gradients are read. `sharded_reads()` turns
that off for a block (an embedding lookup reads its table's shard).
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["within_shardimpl", "is_within", "step_context", "layer_call", "in_layer_call", "sharded_reads"]

_local = threading.local()


class _counting:
    """This thread's counter ``name`` one higher while the block runs (blocks nest). A class,
    not a generator: entered around every layer call of a step (a generator-based context
    manager costs about three times as much)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        setattr(_local, self.name, getattr(_local, self.name, 0) + 1)

    def __exit__(self, *exc):
        setattr(_local, self.name, getattr(_local, self.name) - 1)
        return False


def is_within() -> bool:
    return getattr(_local, "depth", 0) > 0


def within_shardimpl():
    """Mark a block as already running under shardimpl's context."""
    return _counting("depth")


def in_layer_call() -> bool:
    """True inside a layer call within shardimpl's context, unless `sharded_reads` is active."""
    return getattr(_local, "layers", 0) > 0 and not getattr(_local, "sharded", 0)


def layer_call():
    """Mark a block as a layer's ``call`` (see `in_layer_call`)."""
    return _counting("layers")


def sharded_reads():
    """Variables read as their shards in this block, even inside a layer call."""
    return _counting("sharded")


@contextlib.contextmanager
def step_context(pack_other=None, regather: bool = True):
    """Mixed plain/DTensor ops allowed, attention through decomposable math ops, gathered
    weights saved as re-gather tokens (``pack_other`` packs every other saved tensor).

    ``regather=False`` (a step under a distribution without a data axis: nothing is gathered
    for FSDP) and no ``pack_other``: no saved-tensor hooks at all, so every tensor an op saves
    is saved as it is, with no Python call per saved tensor forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shardimpl.fsdp import regather_hooks

    hooks = regather_hooks(pack_other) if pack_other is not None or regather else contextlib.nullcontext()
    with within_shardimpl(), _implicit_replication(), sdpa_kernel([SDPBackend.MATH]), hooks:
        yield


@contextlib.contextmanager
def _implicit_replication():
    """DTensor's implicit replication for the block, then back to what it was (torch's own
    context manager sets it to False on exit, which would undo the installed setting)."""
    from torch.distributed.tensor import DTensor

    dispatcher = DTensor._op_dispatcher
    previous = dispatcher._allow_implicit_replication
    dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        dispatcher._allow_implicit_replication = previous
