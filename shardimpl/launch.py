"""The rank launcher: run a function on N ranks and get one result row per rank, never a hang.

``run(fn, nprocs, *args)`` starts ``nprocs`` processes (gloo on CPU; NCCL with
one rank per GPU when there are enough GPUs; gloo with ranks sharing GPUs when
there are not), joins them in one process group through a fresh ``file://``
rendezvous, calls ``fn(*args)`` on each and returns their rows in rank order.

A rank that raises becomes ``status="error"``, one that runs out of memory
``"oom"``, one still running at the deadline ``"timeout"``; after the first
failure the others get a short grace period to finish and are then stopped,
so the call returns within ``timeout`` (start-up included) plus a few seconds.
``fn`` and its arguments are pickled here before any rank starts: one that
cannot reach the ranks (a lambda, a local function) raises TypeError at once.
Nothing is left behind: the rendezvous folder is removed and the ranks are
stopped when the call returns, when a start fails, or when a `World` is
garbage-collected without being closed. Inside a world that a launcher
started (torchrun, or a SLURM step of several tasks: `shardimpl.launchers`)
nothing is spawned: this process is one rank, ``fn`` runs here and every rank
gets all rows, a failed rank's message included, within seconds
(`shardimpl.launched`).

Ranks fork from a forkserver that has imported torch once, so a rank starts
in well under a second after the first.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.reduction
import os
import pickle
import queue as queue_mod
import shutil
import signal
import tempfile
import threading
import time
import weakref
from datetime import timedelta
from typing import Callable

from shardimpl.launchers import LAUNCHER_CHILD_FLAG as _CHILD_FLAG
from shardimpl.outcome import RankResult
from shardimpl.outcome import call as _call
from shardimpl.outcome import describe as _describe

__all__ = ["run", "World", "RankResult", "STATUSES", "process_context", "in_launched_world"]

STATUSES = ("ok", "oom", "error", "timeout")
_GRACE_SECONDS = 5.0


def _backend_for(device: str, nprocs: int) -> str:
    if device == "cpu":
        return "gloo"
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda'. Received: device={device!r}.")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("device='cuda' but this machine has no CUDA device. Use device='cpu'.")
    return "nccl" if count >= nprocs else "gloo"


def _send(out_q, row: RankResult) -> None:
    try:
        payload = pickle.dumps(row)
    except Exception as exc:
        payload = pickle.dumps(RankResult(row.rank, "error", None, f"result is not picklable: {exc!r}"))
    out_q.put(payload)


def _rank_main(rank, world, init_file, backend, device, timeout, in_q, out_q):
    """A rank's life: join the world, then run each (fn, args, budget) sent until None."""
    os.environ.update(
        {_CHILD_FLAG: "1", "RANK": str(rank), "WORLD_SIZE": str(world),
         "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
    )
    import faulthandler

    import torch
    import torch.distributed as dist

    # A rank killed by a signal (a segfault in a C++ kernel or in gloo) reports nothing through
    # the queue ("died with exit code -11"); its Python stacks go to stderr instead.
    faulthandler.enable(all_threads=True)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    from shardimpl.budgets import prefer_mmap

    prefer_mmap()  # freed memory leaves the rank, so budgets bite even if the env var came too late
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks share the machine's cores: N ranks x all cores each oversubscribes them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=timedelta(seconds=max(timeout, 1.0)),
        )
    except BaseException as exc:
        _send(out_q, RankResult(rank, "error", None, _describe(exc)))
        in_q.get()  # report the failure at the first call, then leave
        os._exit(0)
    while True:
        command = in_q.get()
        if command is None:
            break
        try:
            fn, args, budget_bytes = pickle.loads(command)
        except BaseException as exc:  # e.g. fn's module is not importable in the rank
            _send(out_q, RankResult(rank, "error", None, _describe(exc)))
            break
        row = _call(fn, args, device, budget_bytes)
        _send(out_q, row)
        if row.status != "ok":
            break  # peers may be stuck in a collective with us: the world is done
    out_q.close()
    out_q.join_thread()
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    os._exit(0)


_CTX = None


def process_context():
    """The forkserver context every rank starts from (torch, torch.distributed, shardimpl and,
    with KERAS_BACKEND=torch, keras imported once): also for pools that should start like ranks."""
    global _CTX
    if _CTX is None:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        ctx = mp.get_context("forkserver")
        preload = ["torch", "torch.distributed", "shardimpl"]
        if os.environ.get("KERAS_BACKEND") == "torch":
            preload.append("keras")
        ctx.set_forkserver_preload(preload)
        _CTX = ctx
    return _CTX


def _stop_all(procs, grace: float = 1.0) -> None:
    """SIGTERM every live rank, wait up to ``grace`` seconds for all, SIGKILL the rest."""
    procs = [p for p in procs if p.pid is not None]  # never started: nothing to stop
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.join(1.0)


def _cleanup(procs, workdir) -> None:
    """What a World leaves if it is never closed: stop its ranks, remove its rendezvous folder."""
    _stop_all(procs, grace=0.5)
    shutil.rmtree(workdir, ignore_errors=True)


def _pickled_call(fn, args, budget_bytes, where: str) -> bytes:
    """The command a rank receives, pickled here: a fn the ranks cannot receive fails now, not there."""
    try:
        return bytes(multiprocessing.reduction.ForkingPickler.dumps((fn, args, budget_bytes)))
    except Exception as exc:
        raise TypeError(
            f"{where}: fn and its arguments must be picklable to reach the ranks (fn a "
            f"module-level function of an importable module, arguments plain data). Received: "
            f"fn={getattr(fn, '__qualname__', fn)!r}, which cannot be pickled: {exc}. Move fn to "
            "the top level of a module (not a lambda, a local function or a bound method of an "
            "unpicklable object)."
        ) from None


def in_launched_world() -> bool:
    """True when a launcher started this process as one rank of a world of several (torchrun at
    any size, a SLURM step of two tasks or more); never in ranks this module spawned."""
    from shardimpl.launchers import detect

    found = detect()
    return found is not None and (found.launcher == "torchrun" or
                                  (found.launcher == "slurm" and found.world_size > 1))


class World:
    """``nprocs`` ranks kept alive between calls: ``with World(4) as w: w.run(fn, *args)``.

    Starting ranks and joining them costs seconds; a `World` pays it once, so
    benchmarks can time ``fn`` itself. After a call in which any rank failed
    or timed out the world is closed (its ranks may be stuck in a collective);
    later calls raise RuntimeError.
    """

    def __init__(self, nprocs: int, *, device: str = "cpu", timeout: float = 300.0):
        if int(nprocs) < 1:
            raise ValueError(f"nprocs must be >= 1. Received: nprocs={nprocs}.")
        self.nprocs = int(nprocs)
        self.device = device
        self.backend = _backend_for(device, self.nprocs)
        self._timeout = timeout
        self._procs = []
        self._workdir = None
        self._finalizer = None
        self._starting = threading.Lock()  # held while start() runs (maybe in a starter thread)
        self._abandoned = False  # the deadline passed during start(): it cleans up when done
        self.closed = False

    def start(self) -> "World":
        """Start the ranks (they join in the background); on any failure nothing is left behind."""
        with self._starting:
            if not self._procs:
                self._start()
        return self

    def _start(self) -> None:
        ctx = process_context()
        self._workdir = tempfile.mkdtemp(prefix="shardimpl-rdzv-")
        procs: list = []
        self._finalizer = weakref.finalize(self, _cleanup, procs, self._workdir)
        try:
            self._out_q = ctx.Queue()
            self._in_qs = [ctx.Queue() for _ in range(self.nprocs)]
            for r in range(self.nprocs):
                procs.append(ctx.Process(
                    target=_rank_main,
                    args=(r, self.nprocs, os.path.join(self._workdir, "store"), self.backend,
                          self.device, self._timeout, self._in_qs[r], self._out_q),
                    daemon=True,
                ))
            for p in procs:
                p.start()
        except BaseException:
            self._finalizer()  # stop what started, remove the rendezvous folder
            self.closed = True
            raise
        self._procs = procs

    def _start_by(self, deadline: float) -> bool:
        """Start the ranks, waiting at most until ``deadline``; False if they were still starting.

        Starting can block for seconds (the forkserver imports torch once per
        session, more on a loaded machine); it runs in a thread so that the
        deadline holds. A start that misses it finishes in that thread and then
        stops its ranks and removes its folder.
        """
        box: dict = {}
        lock = threading.Lock()

        def starter():
            try:
                self.start()
            except BaseException as exc:
                box["error"] = exc
            with lock:
                box["done"] = True
                abandoned = self._abandoned
            if abandoned and self._finalizer is not None:
                self._finalizer()

        thread = threading.Thread(target=starter, name="shardimpl-world-start", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        with lock:
            if not box.get("done"):
                self._abandoned = self.closed = True
                return False
        if "error" in box:
            raise box["error"]
        return True

    def run(self, fn: Callable, *args, timeout: float | None = None,
            budget_bytes: int | None = None, _deadline: float | None = None) -> list[RankResult]:
        """Run ``fn(*args)`` on every rank; rows in rank order (see `run` for statuses).

        ``timeout`` bounds this call, including the ranks' start-up when it is the first.
        """
        deadline = _deadline or time.monotonic() + (timeout or self._timeout)
        if self.closed:
            raise RuntimeError("this World is closed (a rank failed or timed out); start a new one.")
        command = _pickled_call(fn, args, budget_bytes, "World.run")
        if not self._procs and not self._start_by(deadline):
            return [RankResult(r, "timeout", None, "the ranks were still starting at the deadline "
                               "(the timeout includes start-up); stopped once started")
                    for r in range(self.nprocs)]
        for q in self._in_qs:
            q.put(command)
        rows = _collect(self._procs, self._out_q, deadline)
        if any(r.status != "ok" for r in rows.values()):
            self.close(grace=0.5)  # ranks that failed or timed out may be stuck in a collective
        return [rows[r] for r in range(self.nprocs)]

    def close(self, grace: float = 3.0) -> None:
        """Let the ranks leave (up to ``grace`` s), stop the rest, remove the rendezvous folder."""
        if self._abandoned:
            return  # the starter thread cleans up once its start finishes
        if self.closed or not self._procs:
            self.closed = True
            if self._finalizer is not None:
                self._finalizer()
            return
        self.closed = True
        for q in self._in_qs:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        _stop_all(self._procs)
        self._out_q.close()
        self._finalizer()

    def __enter__(self) -> "World":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def run(
    fn: Callable,
    nprocs: int,
    *args,
    device: str = "cpu",
    timeout: float = 300.0,
    budget_bytes: int | None = None,
) -> list[RankResult]:
    """Run ``fn(*args)`` on ``nprocs`` ranks and return one `RankResult` per rank, in rank order.

    ``fn`` (a module-level function) and ``args`` must be picklable: TypeError at
    once otherwise, before any rank starts. A return value that cannot be
    pickled makes that rank's row an error.
    ``budget_bytes`` puts every rank under `shardimpl.budgets.budget` while
    ``fn`` runs. ``timeout`` (seconds) bounds the whole call, start-up
    included: ranks still running then are stopped and reported as "timeout";
    the call returns at most a few seconds (stopping the ranks) after it.
    """
    deadline = time.monotonic() + timeout
    if in_launched_world():
        from shardimpl import launched

        return launched.run(fn, int(nprocs), args, device, budget_bytes, timeout)
    world = World(nprocs, device=device, timeout=timeout)
    try:
        return world.run(fn, *args, timeout=timeout, budget_bytes=budget_bytes, _deadline=deadline)
    finally:
        world.close()


def _collect(procs, out_q, deadline) -> dict[int, RankResult]:
    rows: dict[int, RankResult] = {}
    failed_at = None
    exited_since: dict[int, float] = {}
    while len(rows) < len(procs):
        now = time.monotonic()
        limit = deadline if failed_at is None else min(deadline, failed_at + _GRACE_SECONDS)
        if now >= limit:
            break
        try:
            row = pickle.loads(out_q.get(timeout=0.05))
            rows[row.rank] = row
            if row.status != "ok" and failed_at is None:
                failed_at = time.monotonic()
            continue
        except queue_mod.Empty:
            pass
        for r, p in enumerate(procs):
            if r in rows or p.is_alive():
                continue
            # Give a row in flight a moment to arrive before calling the rank dead.
            first = exited_since.setdefault(r, now)
            if now - first > 1.0:
                rows[r] = RankResult(r, "error", None, f"rank {r} died with exit code {p.exitcode} "
                                     "before reporting (killed by a signal or os._exit)")
                failed_at = failed_at or now
    timed_out = time.monotonic() >= deadline
    first_failure = next((rows[r] for r in sorted(rows) if rows[r].status != "ok"), None)
    for r in range(len(procs)):
        if r in rows:
            continue
        if timed_out or first_failure is None:
            rows[r] = RankResult(r, "timeout", None, "still running at the deadline; stopped")
        else:
            rows[r] = RankResult(
                r, "error", None,
                f"stopped {_GRACE_SECONDS:.0f} s after rank {first_failure.rank} "
                f"failed ({first_failure.status})",
            )
    return rows
