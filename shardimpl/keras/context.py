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


@contextlib.contextmanager
def _counting(name: str):
    """This thread's counter ``name`` one higher while the block runs (blocks nest)."""
    setattr(_local, name, getattr(_local, name, 0) + 1)
    try:
        yield
    finally:
        setattr(_local, name, getattr(_local, name) - 1)


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
def step_context(pack_other=None):
    """Mixed plain/DTensor ops allowed, attention through decomposable math ops, gathered
    weights saved as re-gather tokens (``pack_other`` packs every other saved tensor)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shardimpl.fsdp import regather_hooks

    with within_shardimpl(), _implicit_replication(), sdpa_kernel([SDPBackend.MATH]), \
            regather_hooks(pack_other):
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
