"""Agreement points: every rank learns that one rank failed before anyone blocks.

A rank-local fault (a bad argument on one rank, an allocation that fails, a
write that raises) followed by a collective on the other ranks is a hang: the
healthy ranks wait in the collective until the process-group timeout. shardimpl
avoids it with *agreement points*: before a step that communicates (a gather,
a checkpoint swap), every rank reports "ok" or its problem in one small
all-reduce, and all of them either go on together or raise together.

`agree` is that all-reduce. Its tensor always has the same size, so a rank
that failed somewhere else and reports from its error handler meets the
healthy ranks' next agreement point, whichever it is: a sequence of steps in
which every collective is preceded by an agreement point (the gathers of a
Keras save) ends on every rank within one step of a fault.

It also checks that values which must be equal on every rank (``dst``, the
gathered variable's shape, a checksum) are: each value travels as ``v`` and
``-v`` in one MAX all-reduce, so ``max == -max(-v)`` means all agree.

Communication: one all-reduce of ``1 + 2 * SLOTS`` int64 over the world group
(72 bytes); on failure, one ``all_gather_object`` of the messages. Nothing
without a process group or with one rank. A rank that never arrives (stopped,
cut off) makes the others fail at the process group's timeout with
`shardimpl.rendezvous.RanksMissing`, which names it.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
import torch.distributed as dist

from shardimpl.rendezvous import explain

__all__ = ["agree", "during", "PeerFailure", "checksum", "mark_agreed", "was_agreed", "describe"]

SLOTS = 4
_FLAG = "_shardimpl_agreed"
_operations: list[str] = []


@contextlib.contextmanager
def during(operation: str):
    """Name the operation that agreement points inside the block belong to (e.g. a save),
    so a `PeerFailure` raised at a gather says which save stopped."""
    _operations.append(operation)
    try:
        yield
    finally:
        _operations.pop()


class PeerFailure(RuntimeError):
    """Raised on the healthy ranks when another rank reported a failure at an agreement point.

    ``problems`` maps each failed rank to its message.
    """

    def __init__(self, message: str, problems: dict[int, str]):
        super().__init__(message)
        self.problems = problems


def describe(exc: BaseException) -> str:
    """One line for an exception: its type and message (shortened)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 1500 else text[:1500] + " ..."


def checksum(*parts) -> int:
    """A 31-bit checksum of ``repr(parts)`` (shapes, dtypes, names) for `agree`'s values."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def mark_agreed(exc: BaseException) -> BaseException:
    """Mark ``exc`` as already known to every rank (no further agreement is needed for it)."""
    try:
        setattr(exc, _FLAG, True)
    except Exception:  # some C exceptions take no attributes
        pass
    return exc


def was_agreed(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) went through an agreement point."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, _FLAG, False):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _device():
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _absent_ranks_named(where: str):
    """A collective's timeout here becomes `shardimpl.rendezvous.RanksMissing` naming the ranks
    that did not arrive (a rank stopped or cut off), known to every rank that waited."""
    try:
        yield
    except Exception as exc:
        named = explain(exc, where)
        if named is not None:
            raise mark_agreed(named) from exc
        raise


def agree(problem: str | None, *, where: str, values=(), names=(), error: BaseException | None = None,
          mismatch: str | None = None):
    """Meet every rank at an agreement point; raise on every rank if any rank has a problem.

    Args:
        problem: None when this rank is ready, else one line saying what went wrong.
        where: the operation, for messages (``"gather_variable"``).
        values: up to `SLOTS` ints that must be equal on every rank.
        names: their names, for the mismatch message.
        error: this rank's own exception, re-raised here (marked as agreed)
            instead of a `PeerFailure`, so the failing rank keeps its precise error.
        mismatch: what must hold and the fix, for the ValueError raised when
            ``values`` differ (default: "same arguments in the same order").

    Raises (on every rank, after the all-reduce): ``error`` or `PeerFailure`
    when some rank reported a problem; ValueError when the ``values`` differ
    across ranks. Collective: see the module docstring.
    """
    if _operations and not where.startswith(_operations[-1]):
        where = f"{_operations[-1]} (at {where})"
    values = [int(v) for v in values]
    if len(values) > SLOTS:
        raise ValueError(f"agree takes at most {SLOTS} values. Received: {len(values)}.")
    if _world() == 1:
        if problem is not None:
            raise mark_agreed(error if error is not None else RuntimeError(f"{where}: {problem}"))
        return
    values += [0] * (SLOTS - len(values))
    t = torch.zeros(1 + 2 * SLOTS, dtype=torch.int64)
    if problem is not None:
        t[0] = 1  # a failed rank's values are ignored: only the failure counts
    else:
        for i, v in enumerate(values):
            t[1 + 2 * i], t[2 + 2 * i] = v, -v
    device = _device()
    t = t.to(device)
    with _absent_ranks_named(where):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    t = t.cpu()
    if int(t[0]):
        messages = [None] * dist.get_world_size()
        with _absent_ranks_named(where):
            dist.all_gather_object(messages, problem)
        problems = {r: m for r, m in enumerate(messages) if m is not None}
        if error is not None:
            raise mark_agreed(error)
        listed = "; ".join(f"rank {r}: {m.rstrip('.')}" for r, m in problems.items())
        raise mark_agreed(PeerFailure(
            f"{where} stopped on every rank because rank(s) {sorted(problems)} failed: {listed}. "
            "No rank waits for the failed one; fix the failing rank's error and call again on every rank.",
            problems,
        ))
    bad = []
    for i, name in enumerate(list(names) + [f"value {j}" for j in range(len(names), SLOTS)]):
        high, low = int(t[1 + 2 * i]), -int(t[2 + 2 * i])
        if high != low:
            bad.append(f"{name} ranges over [{low}, {high}] (this rank: {values[i]})")
    if bad:
        mismatch = mismatch or (
            "every rank must call it with the same arguments, in the same order. Call it on "
            "every rank with identical arguments (same variable, same dst)."
        )
        raise mark_agreed(ValueError(f"{where}: {mismatch} Received: {'; '.join(bad)} across ranks."))
