"""Joining the world from its launcher, with a timeout a person would wait for, naming absent ranks.

`initialize()` reads the launcher (`shardimpl.launchers`: torchrun, SLURM's
srun, or MASTER_ADDR/RANK/WORLD_SIZE), connects to the rendezvous store
(torchrun's agent store, or one served by rank 0), waits for every rank there
(a *roll call*: each rank writes its key, so the ranks that never came are
named), then creates the process group with ``timeout``. The same timeout
bounds every later collective: a rank that is stopped (SIGSTOP), cut off or
stuck makes the others fail after ``timeout`` seconds instead of torch's
default 30 minutes. It is the argument, else ``SHARDIMPL_TIMEOUT`` (seconds),
else `DEFAULT_TIMEOUT`.

`explain()` turns a collective's timeout error ("Timed out waiting 300000ms
for recv operation", gloo's words) into `RanksMissing` naming the ranks that
did not answer a roll call held right after it. The ranks that timed out meet
in the store for up to `roll_call_seconds` (at most 10 s); a rank that is not
there is stopped, cut off, or still busy elsewhere. The store answers even
when a rank's process is stopped, except when that rank serves the store
(rank 0 outside torchrun, whose agent serves it): then the error says so.

`leave()` ends a world after a failed call: the process group's connections
are released (`shardimpl.release`) and the group destroyed; the next
`initialize()` joins a new generation of the world through the same store.

Communication: the join writes one key per rank and waits for all; a roll
call the same. Nothing here imports Keras.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from shardimpl import launchers, release

__all__ = ["initialize", "timeout_seconds", "RanksMissing", "explain", "roll_call", "leave", "bounded",
           "joined", "store", "serves_store", "hosts", "describe_world", "DEFAULT_TIMEOUT", "TIMEOUT_ENV"]

DEFAULT_TIMEOUT = 300.0  # five minutes: long enough for rank 0 alone writing a large file
TIMEOUT_ENV = "SHARDIMPL_TIMEOUT"
_EXPLAINED = "_shardimpl_explained"
# A store request waits this long for its reply at least: the joins and roll calls keep their own
# deadlines; a short collective timeout must not turn a slow reply on a loaded host into an error.
_STORE_REPLY_SECONDS = 60.0
_TIMEOUT_WORDS = re.compile(r"timed out|timeout", re.IGNORECASE)
_FROM_TORCH = re.compile(r"gloo|nccl|c10d|ProcessGroup|Watchdog", re.IGNORECASE)

_state: dict = {"launch": None, "store": None, "timeout": None, "generation": 0, "roll_calls": 0}


class RanksMissing(TimeoutError):
    """Some ranks did not arrive (at the join, or at a collective that timed out).

    ``missing``: their ranks (empty when they could not be named); ``seconds``:
    how long this rank waited; ``store_answered``: False when the rendezvous
    store itself did not answer the roll call.
    """

    def __init__(self, message: str, missing: list[int], seconds: float, store_answered: bool = True):
        super().__init__(message)
        self.missing, self.seconds, self.store_answered = missing, seconds, store_answered


def timeout_seconds(timeout: float | None = None) -> float:
    """``timeout`` if given, else ``SHARDIMPL_TIMEOUT`` from the environment, else `DEFAULT_TIMEOUT`."""
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(
                f"{TIMEOUT_ENV} must be a number of seconds. Received: {TIMEOUT_ENV}={text!r}. "
                f"Set it to e.g. 120, or unset it for the default ({DEFAULT_TIMEOUT:g} s)."
            ) from None
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds. Received: timeout={timeout}.")
    return timeout


def roll_call_seconds(timeout: float) -> float:
    """How long the ranks meet after a timeout: a tenth of it, between 2 and 10 s."""
    return min(10.0, max(2.0, timeout / 10))


def _launch_from(address, world_size, rank) -> launchers.Launch:
    """The launcher's `Launch`, with what was given by hand in its place."""
    found = launchers.detect()
    if address is None and world_size is None and rank is None and found is not None:
        return found
    host, _, port = (address or "").split(",")[0].partition(":")
    host = host or (found.master_addr if found else None)
    port = int(port) if port else (found.master_port if found else None) or 29500
    world = int(world_size) if world_size is not None else (found.world_size if found else None)
    me = int(rank) if rank is not None else (found.rank if found else None)
    missing = [n for n, v in (("address", host), ("world_size", world), ("rank", me)) if v is None]
    if missing:
        raise ValueError(
            "initialize(): this process needs rank 0's address, the world size and its own rank; "
            f"no launcher said them. Missing: {missing}. Start it with torchrun or srun, set "
            "MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE, or pass address='host:port', "
            "world_size=N, rank=R (keras.distribution.initialize(job_addresses, num_processes, "
            "process_id))."
        )
    if found is not None and found.world_size == world:
        return launchers.Launch(found.launcher, me, world, found.local_rank, found.local_world_size,
                                host, port, found.hosts, found.node)
    return launchers.Launch("env", me, world, 0, world, host, port)


def _namespace(launch: launchers.Launch) -> str:
    """Keys of one world (and one torchrun restart, one generation) never meet another's."""
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "local"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"shardimpl/{run}/{restart}/{launch.world_size}"


def _connect(launch: launchers.Launch, seconds: float):
    if launch.master_addr is None or launch.master_port is None:
        raise ValueError(
            f"initialize(): {launch.launcher} gave no rendezvous address (MASTER_ADDR/MASTER_PORT). "
            "Set them, or pass address='host:port'."
        )
    serve = serves_store(launch)
    try:
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, serve,
                              timedelta(seconds=seconds), wait_for_workers=False, multi_tenant=True)
    except Exception as exc:
        if serve:
            raise RuntimeError(
                f"initialize(): rank 0 must serve the rendezvous on port {launch.master_port} of this "
                f"host ({socket.gethostname()}). Received: {type(exc).__name__}: {exc}. Another job may "
                "hold the port: set MASTER_PORT to a free one (the same on every rank)."
            ) from exc
        raise RanksMissing(
            f"initialize(): rank 0 did not open the rendezvous at {launch.master_addr}:"
            f"{launch.master_port} within {seconds:g} s ({launch.describe()}). It was not started, "
            "is stopped, or runs on another host than MASTER_ADDR (under SLURM: the step's first "
            f"node). Received: {type(exc).__name__}: {exc}", [0], seconds) from exc
    store.set_timeout(timedelta(seconds=max(seconds, _STORE_REPLY_SECONDS)))  # connected: now the replies
    return dist.PrefixStore(_namespace(launch), store)


def serves_store(launch: launchers.Launch | None = None) -> bool:
    """Whether this process hosts the rendezvous store: rank 0, unless torchrun's agent does. While
    it lives the store answers; once it exits, every other rank's store request fails."""
    launch = launch or joined()
    if launch is None:
        return False
    agent = launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return launch.rank == 0 and not agent


def _gather_keys(base, kind: str, rank: int, world: int, value: str, seconds: float) -> list[int]:
    """Write this rank's key under ``kind``; wait up to ``seconds`` for every rank's; the absent ones.
    (Polls: a store wait that times out prints a C++ warning per rank.)"""
    base.set(f"{kind}/{rank}", value)
    keys = [f"{kind}/{r}" for r in range(world)]
    deadline = time.monotonic() + seconds
    while not base.check(keys):
        if time.monotonic() >= deadline:
            return [r for r in range(world) if not base.check([keys[r]])]
        time.sleep(0.05)
    return []


def initialize(*, timeout: float | None = None, backend: str | None = None, address: str | None = None,
               world_size: int | None = None, rank: int | None = None) -> launchers.Launch:
    """Join the world this process belongs to; a no-op (returns it) when a process group exists.

    Args:
        timeout: seconds any rank waits for the others, at the join and in every
            collective afterwards (default: ``SHARDIMPL_TIMEOUT``, else 300).
        backend: "gloo" or "nccl" (default: NCCL when CUDA is available, else gloo).
        address, world_size, rank: the world by hand ("host:port" of rank 0);
            by default the launcher's (torchrun, srun, MASTER_ADDR/RANK/WORLD_SIZE).

    Raises `RanksMissing` naming the ranks that did not join within ``timeout``,
    ValueError when no launcher says who this process is. Collective: every
    rank writes one key to the store and waits for all; then torch's own
    process-group creation. Sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT in the environment where they were unset (e.g. under srun).
    """
    if dist.is_initialized():
        return joined() or _launch_from(address, world_size, rank)
    seconds = timeout_seconds(timeout)
    launch = _launch_from(address, world_size, rank)
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"initialize(): rank must be in [0, world_size). Received: {launch.describe()}.")
    base = _state["store"] if _state["launch"] == launch else None
    if base is None:
        base = _connect(launch, seconds)
        _state.update(launch=launch, store=base, generation=0)
    world = dist.PrefixStore(f"g{_state['generation']}", base)
    me = json.dumps({"host": socket.gethostname(), "node": launch.node, "local_rank": launch.local_rank})
    missing = _gather_keys(world, "join", launch.rank, launch.world_size, me, seconds)
    if missing:
        _state.update(launch=None, store=None)  # a later initialize() connects afresh
        raise RanksMissing(
            f"initialize(): rank(s) {missing} of {launch.world_size} did not join within {seconds:g} s "
            f"({launch.describe()}). They were not started, are stopped, or cannot reach "
            f"{launch.master_addr}:{launch.master_port}; raise the wait with {TIMEOUT_ENV} or timeout=.",
            missing, seconds)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    release.note_listeners_before_groups()
    dist.init_process_group(backend, store=dist.PrefixStore("pg", world), rank=launch.rank,
                            world_size=launch.world_size, timeout=timedelta(seconds=seconds))
    _state["timeout"] = seconds
    _set_environment(launch)
    return launch


def _set_environment(launch: launchers.Launch) -> None:
    for name, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                        ("LOCAL_RANK", launch.local_rank), ("LOCAL_WORLD_SIZE", launch.local_world_size),
                        ("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port)):
        os.environ.setdefault(name, str(value))


def joined() -> launchers.Launch | None:
    """The `Launch` this process joined through `initialize()` (None if it did not, or left)."""
    return _state["launch"] if dist.is_initialized() and _state["store"] is not None else None


def store():
    """This world's store for shardimpl's own keys (this generation), or None if `initialize()`
    did not create the process group."""
    if joined() is None:
        return None
    return dist.PrefixStore(f"g{_state['generation']}/shardimpl", _state["store"])


def hosts() -> list[dict] | None:
    """Every rank's {"host", "node", "local_rank"} as written at the join, in rank order."""
    launch = joined()
    if launch is None:
        return None
    world = dist.PrefixStore(f"g{_state['generation']}", _state["store"])
    values = world.multi_get([f"join/{r}" for r in range(launch.world_size)])
    return [json.loads(v) for v in values]


def describe_world() -> dict | None:
    """The joined world for reports: launcher, size, nodes, each rank's host and node, ranks per host."""
    launch, per_rank = joined(), hosts()
    if launch is None or per_rank is None:
        return None
    names = [h["host"] for h in per_rank]
    per_host: dict[str, int] = {}
    for name in names:
        per_host[name] = per_host.get(name, 0) + 1
    return {"launcher": launch.launcher, "world_size": launch.world_size,
            "nodes": len({(h["host"], h["node"]) for h in per_rank}),
            "hosts": names, "node_of_rank": [h["node"] for h in per_rank], "ranks_per_host": per_host,
            "rendezvous": f"{launch.master_addr}:{launch.master_port}", "timeout_seconds": _state["timeout"]}


def _is_timeout(exc: BaseException) -> bool:
    """A collective's or the store's timeout (torch's words), not any error that says "timeout"."""
    text = str(exc)
    from_torch = isinstance(exc, dist.DistError) or bool(_FROM_TORCH.search(text))
    return isinstance(exc, RuntimeError) and from_torch and bool(_TIMEOUT_WORDS.search(text))


def bounded(op, seconds: float):
    """``op()`` in a daemon thread, waited for at most ``seconds``: TimeoutError after that.

    A store client's requests can block past its timeout when the server's
    process is stopped or its host cut off (a ``check`` waits for a reply that
    never comes); such a thread is abandoned. ``op`` should use its own client
    (``store.clone()`` inside ``op``), so that no other client is left locked.
    """
    box: dict = {}

    def target():
        try:
            box["value"] = op()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="shardimpl-store-op", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"the rendezvous store did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def roll_call(where: str, seconds: float) -> tuple[list[int], str | None]:
    """Meet the other ranks in the store for up to ``seconds``: (the absent ranks, a note when the
    store itself did not answer). Every rank that calls it must call it the same number of times."""
    launch, main = joined(), store()
    if launch is None:
        return [], "no shardimpl rendezvous store (the process group was created elsewhere)"
    _state["roll_calls"] += 1
    kind = f"roll/{_state['roll_calls']}"
    try:
        return bounded(lambda: _gather_keys(main.clone(), kind, launch.rank, launch.world_size, where,
                                            seconds), seconds + 2.0), None
    except Exception as exc:
        if launch.launcher == "torchrun":  # the agent on node 0 serves it: node 0 is gone or cut off
            return [], (f"the rendezvous store at {launch.master_addr}:{launch.master_port} (torchrun's "
                        f"agent on node 0) did not answer within {seconds:g} s: node 0 stopped or unreachable")
        return [0], (f"rank 0 serves the rendezvous store at {launch.master_addr}:{launch.master_port}, "
                     f"and it did not answer within {seconds:g} s ({type(exc).__name__})")


def explain(exc: BaseException, where: str) -> RanksMissing | None:
    """For a collective's timeout error: a `RanksMissing` naming the absent ranks, else None
    (another error, or a process group that `initialize()` did not create: no store to meet in).

    Holds a roll call (see the module docstring) once per error; the caller
    raises the result ``from exc``.
    """
    if not _is_timeout(exc) or getattr(exc, _EXPLAINED, False) or isinstance(exc, RanksMissing):
        return None
    if joined() is None:  # a process group made elsewhere (e.g. launch.World's ranks): no store of ours
        return None
    timeout = _state["timeout"]
    wait = roll_call_seconds(timeout)
    missing, note = roll_call(where, wait)
    who = (f"rank(s) {missing} did not arrive" if missing else
           "the absent ranks could not be named" if note else "every rank answered the roll call")
    error = RanksMissing(
        f"{where}: a collective timed out after {timeout:g} s and {who} "
        f"({note or f'roll call of {wait:g} s held after the timeout'}). A rank that did not arrive "
        "is stopped, cut off, or still busy elsewhere (e.g. rank 0 alone writing a large file: raise "
        f"{TIMEOUT_ENV} or initialize(timeout=)). Received: {str(exc).splitlines()[0][:300]}",
        missing, timeout, store_answered=note is None)
    setattr(error, _EXPLAINED, True)
    try:
        setattr(exc, _EXPLAINED, True)
    except Exception:
        pass
    return error


def leave() -> None:
    """End this world after a failed call: release its connections, destroy the process group,
    so that the next `initialize()` joins a fresh generation (every rank must call it)."""
    launch = joined()
    if dist.is_initialized() and str(dist.get_backend()) == "gloo":  # NCCL's sockets are not ours to close
        release.release_connections(keep_port=launch.master_port if launch else None)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    if _state["store"] is not None:
        _state["generation"] += 1
        _state["roll_calls"] = 0
