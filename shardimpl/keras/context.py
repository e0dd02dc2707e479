"""The context shardimpl runs Keras code in: one flag for "inside shardimpl", one for the ops.

`within_shardimpl()` marks a block that already runs under shardimpl's
context (a trainer step, an outermost direct call), so nested layer calls
do not enter it again and return DTensors to their caller. `step_context()`
lets plain tensors mix with DTensors (treated as replicated) and sends
attention through decomposable math ops (DTensor has no rule for the fused
CPU/flash attention backward).
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["within_shardimpl", "is_within", "step_context"]

_local = threading.local()


def is_within() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def within_shardimpl():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


@contextlib.contextmanager
def step_context():
    """Mixed plain/DTensor ops allowed, and attention through decomposable math ops."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with within_shardimpl(), _implicit_replication(), sdpa_kernel([SDPBackend.MATH]):
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
