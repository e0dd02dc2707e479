"""ATen operator calls per train step, counted with torch.profiler.

`count_ops(step)` runs ``step()`` once under the profiler (CPU activity, no shapes, no stacks)
and counts its events: every ``aten::`` operator call, nested ones included (``aten::linear``
and the ``aten::addmm`` it calls are two), and the collectives (gloo/NCCL and c10d events).
A second run of ``step()`` under a TorchDispatchMode counts the outermost operator calls and
those DTensor dispatched (DTensor's C++ fast path records no profiler event of its own).
Counted alike for stock Keras, shardimpl and the hand-written reference.
"""

from __future__ import annotations

__all__ = ["count_ops"]


def _dtensor_mode(counter: dict):
    """A TorchDispatchMode that counts the ops called with a DTensor among their arguments: each
    is one DTensor dispatch (sharding propagation, perhaps a redistribution, the local op). A
    mode sits above tensor subclasses, so it sees DTensor's calls, not the local ops they run."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can dispatch to it
        DTensor = ()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counter["dispatched_ops"] += 1
            if DTensor and any(isinstance(a, DTensor) for a in tree_flatten((args, kwargs or {}))[0]):
                counter["dtensor_dispatches"] += 1
            return func(*args, **(kwargs or {}))

    return _Count()


def count_ops(step) -> dict:
    """Run ``step()`` twice, once under torch.profiler, once under a dispatch mode: the counts
    of its ATen ops, collectives and DTensor dispatches per step, and the 10 most called ATen ops."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    counter = {"dtensor_dispatches": 0, "dispatched_ops": 0}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    with _dtensor_mode(counter):
        step()
    names = Counter(e.name for e in prof.events())
    aten = {k: v for k, v in names.items() if k.startswith("aten::")}
    collectives = sum(v for k, v in names.items() if k.startswith(("gloo:", "nccl:", "c10d::")))
    return {"aten_ops": sum(aten.values()), "collectives": collectives,
            "dtensor_dispatches": counter["dtensor_dispatches"], "outer_ops": counter["dispatched_ops"],
            "top_aten": Counter(aten).most_common(10)}
