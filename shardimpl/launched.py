"""`shardimpl.launch.run` inside a world that torchrun or srun started: this process is one rank.

``fn`` runs here; the rows travel through the rendezvous store (not the
process group), so a rank whose ``fn`` failed cannot meet its peers inside one
of ``fn``'s collectives (the cause of gloo's "collective mismatch" aborts).
Every rank returns every rank's row, the failed rank's message included,
within seconds of the failure:

1. While ``fn`` runs, a watcher thread polls the store (its own connection,
   every 0.1 s) for the call's failure key.
2. A rank whose ``fn`` raised releases its connections (`shardimpl.release`),
   writes the failure key (the first writer is "the rank that failed first")
   and its row. Seeing the key, every other rank's watcher releases its
   connections too: a rank waiting in a collective gets gloo's "Connection
   closed by peer" there, and writes its row, marked as stopped by the first
   failure.
3. Each rank waits for every row until the call's deadline; once a failure is
   known, for `GRACE_SECONDS` more, except that after a collective's timeout
   (`shardimpl.rendezvous.RanksMissing`, whose roll call named the absent
   ranks) the absent ranks are not waited for and the present ones are. A
   rank that sends nothing is "timeout". When the store itself does not
   answer (its host stopped or cut off), no row can travel: the other ranks'
   rows say so. Store requests run in bounded threads (`rendezvous.bounded`).
4. The rank that hosts the store (rank 0 outside torchrun) returns only once
   every rank that sent a row has read the rows (or after `GRACE_SECONDS`):
   its exit closes the store under the others' last reads.

After a call in which a rank failed, the process group is destroyed on every
rank (`shardimpl.rendezvous.leave`): its collectives may be half done. The
next call joins a new one through the same store. With NCCL nothing is
released: the peers fail at the process group's timeout.
"""
from __future__ import annotations

import json
import pickle
import threading
import time

import torch.distributed as dist

from shardimpl import launchers, release, rendezvous
from shardimpl.outcome import RankResult
from shardimpl.outcome import call as _call

__all__ = ["run", "GRACE_SECONDS"]

GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.1
_calls = [0]


class _Watcher(threading.Thread):
    """Releases this rank's connections as soon as another rank flags a failure."""

    def __init__(self, store, key: str, keep_port):
        super().__init__(name="shardimpl-failure-watcher", daemon=True)
        self._store, self._key, self._keep = store, key, keep_port
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(_POLL_SECONDS):
            try:
                if self._store.check([self._key]):
                    release.release_connections(keep_port=self._keep)
                    return
            except Exception:  # the store is gone: the world is ending anyway
                return

    def stop(self):
        self._stop_event.set()
        self.join(1.0)


def _store():
    mine = rendezvous.store()
    if mine is not None:
        return mine
    from torch.distributed.distributed_c10d import _get_default_store  # a group made elsewhere

    return dist.PrefixStore("shardimpl", _get_default_store())


def _join(device: str, timeout: float) -> None:
    if dist.is_initialized():
        return
    import torch

    wait = min(rendezvous.timeout_seconds(), timeout)
    rendezvous.initialize(timeout=wait, backend="nccl" if device == "cuda" and torch.cuda.is_available()
                          else "gloo")


def _payload(row) -> bytes:
    try:
        return pickle.dumps(row)
    except Exception as exc:
        return pickle.dumps(type(row)(row.rank, "error", None, f"result is not picklable: {exc!r}"))


def _collect(store, prefix: str, world: int, deadline: float, first_failure):
    """Every rank's row (pickled RankResult) or, for those that never came, None; and the
    first failing rank once known. After a failure explained by a roll call, the rows of the
    ranks it found absent are not waited for, those of the present ones until the deadline (a
    present rank may time out seconds later than another); after any other failure, every
    missing row gets `GRACE_SECONDS`."""
    keys = [f"{prefix}/row/{r}" for r in range(world)]
    failed_at = time.monotonic() if first_failure is not None else None
    absent: set[int] = set()
    while True:
        if store.check(keys):
            return [pickle.loads(v) for v in store.multi_get(keys)], first_failure
        if failed_at is None and store.check([f"{prefix}/failed"]):
            failed_at, first_failure = time.monotonic(), int(store.get(f"{prefix}/failed"))
        if failed_at is not None and not absent and store.check([f"{prefix}/absent"]):
            absent = set(json.loads(store.get(f"{prefix}/absent")))
        # ranks a roll call found present are alive and report: wait for them; others get a grace
        limit = deadline if failed_at is None or absent else min(deadline, failed_at + GRACE_SECONDS)
        waiting = [k for r, k in enumerate(keys) if r not in absent]
        if time.monotonic() >= limit or (absent and store.check(waiting)):
            break
        time.sleep(0.02)
    return [pickle.loads(store.get(k)) if store.check([k]) else None for k in keys], first_failure


def _exchange(store, prefix: str, rank: int, world: int, row, named: list, deadline: float):
    """Flag a failure (the first flag names the first failing rank), send this rank's row, collect
    every rank's: (rows with None for the absent, the first failing rank)."""
    first = None
    if row.status != "ok":
        absent = sorted({r for n in named for r in n.missing})
        if absent:
            store.compare_set(f"{prefix}/absent", "", json.dumps(absent))
        first = int(store.compare_set(f"{prefix}/failed", "", str(rank)))
        if first != rank:
            row = RankResult(rank, row.status, None, f"stopped after rank {first} failed first (see its "
                             f"row); here: {row.error}")
    store.set(f"{prefix}/row/{rank}", _payload(row))
    found, first = _collect(store, prefix, world, deadline, first)
    store.set(f"{prefix}/read/{rank}", "1")
    if rendezvous.serves_store():
        _linger(store, prefix, [r for r, got in enumerate(found) if got is not None and r != rank], deadline)
    return found, first


def _linger(store, prefix: str, readers: list, deadline: float) -> None:
    """The rank that hosts the store waits (up to `GRACE_SECONDS`) until every rank that sent a row
    has read the others': leaving earlier would cut their last reads (a "connection reset")."""
    keys = [f"{prefix}/read/{r}" for r in readers]
    limit = min(deadline, time.monotonic() + GRACE_SECONDS)
    while keys and not store.check(keys) and time.monotonic() < limit:
        time.sleep(0.02)


def _rows(found, first, world: int, own) -> list:
    """`RankResult`s in rank order; ``found`` None: the store did not answer (only ``own`` is known)."""
    if found is None:
        return [own if r == own.rank else RankResult(
            r, "timeout", None, "unknown: the rendezvous store did not answer, so no rank's result "
            "could be exchanged (its host is stopped or cut off)") for r in range(world)]
    why = (f"sent no result after rank {first} failed (absent from its roll call, or silent "
           f"{GRACE_SECONDS:g} s after the failure: stopped, cut off, or busy outside any collective)"
           if first is not None else "still running at the deadline")
    return [got if got is not None else RankResult(r, "timeout", None, why) for r, got in enumerate(found)]


def _check_world(nprocs: int) -> launchers.Launch:
    launch = launchers.detect()
    if nprocs != launch.world_size:
        raise ValueError(
            f"run(nprocs={nprocs}) inside {launch.launcher} with a world of {launch.world_size} ranks: "
            "the ranks are the launcher's. Pass nprocs=WORLD_SIZE (torchrun: --nnodes x "
            f"--nproc-per-node; srun: --ntasks), or launch {nprocs} ranks."
        )
    return launch


def run(fn, nprocs: int, args, device: str, budget_bytes, timeout: float) -> list:
    """``fn(*args)`` on this rank of the launcher's world; every rank's `RankResult`, in rank order."""
    launch = _check_world(nprocs)
    deadline = time.monotonic() + timeout
    _join(device, timeout)
    rank, store = dist.get_rank(), _store()
    _calls[0] += 1
    prefix, gloo, named = f"run/{_calls[0]}", str(dist.get_backend()) == "gloo", []
    exchange = store.clone()  # the rows' own connection, made while the store surely answers
    watcher = _Watcher(store.clone(), f"{prefix}/failed", launch.master_port) if gloo else None
    if watcher is not None:
        watcher.start()
    try:
        row = _call(fn, args, device, budget_bytes, where=f"launch.run({getattr(fn, '__qualname__', fn)})",
                    named=named)
    finally:
        if watcher is not None:
            watcher.stop()
    if row.status != "ok" and gloo:
        release.release_connections(keep_port=launch.master_port)
    found = first = None
    if all(n.store_answered for n in named):  # else its host is stopped or cut off: no exchange
        try:
            found, first = rendezvous.bounded(
                lambda: _exchange(exchange, prefix, rank, launch.world_size, row, named, deadline),
                max(1.0, deadline - time.monotonic()) + 2.0)
        except TimeoutError:
            pass
    rows = _rows(found, first, launch.world_size, row)
    if any(r.status != "ok" for r in rows):
        rendezvous.leave()
    return rows
