"""What started this process: torchrun, SLURM's srun, or MASTER_ADDR/RANK/WORLD_SIZE set by hand.

`detect()` reads the launcher's environment variables into one `Launch`
(rank, world size, local rank, ranks on this host, rank 0's address and
port, the hosts, the launcher's name), so `shardimpl.initialize` (and through
it ``keras.distribution.initialize()``), `shardimpl.launch.run` and
``python -m bench`` agree on who this process is.

The order: torchrun (``TORCHELASTIC_RUN_ID``; its workers get RANK and
friends), then a SLURM job step (``SLURM_STEP_ID`` and ``SLURM_PROCID``: a
task started by ``srun``; the batch script itself and a bare ``salloc`` shell
have no step id and are not a world), then ``MASTER_ADDR`` / ``MASTER_PORT`` /
``RANK`` / ``WORLD_SIZE``. Under SLURM, rank 0's address is the first host of
the step's node list (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``,
in SLURM's compressed form ``node[01-04,07]``) unless ``MASTER_ADDR`` is set,
and the port is `slurm_port` (from the job and step ids) unless
``MASTER_PORT`` is set.

Pure: reads a mapping (``os.environ`` by default), imports nothing heavy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Launch", "detect", "expand_hostlist", "tasks_per_node", "slurm_port", "LAUNCHER_CHILD_FLAG"]

LAUNCHER_CHILD_FLAG = "SHARDIMPL_LAUNCHED_RANK"  # set in ranks that shardimpl.launch spawned itself


@dataclass(frozen=True)
class Launch:
    """One process's place in a world started by a launcher.

    launcher: "torchrun", "slurm" or "env" (the variables set by hand).
    master_addr / master_port: where rank 0 (or torchrun's agent) serves the
        rendezvous; None when the launcher does not say (then pass an address).
    hosts: every host of the world in node order, when the launcher lists
        them (SLURM), else None.
    node: this host's index among the world's nodes (torchrun's GROUP_RANK,
        SLURM_NODEID).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    hosts: tuple[str, ...] | None = None
    node: int = 0

    def describe(self) -> str:
        where = f"{self.master_addr}:{self.master_port}" if self.master_addr else "no address"
        return f"{self.launcher} rank {self.rank} of {self.world_size} (rendezvous {where})"


def _int(env: Mapping[str, str], name: str, where: str) -> int:
    text = env.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{where}: the environment variable {name} must be an integer. Received: {name}={text!r}. "
            "Unset it or set it to the launcher's value."
        ) from None


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list as names: ``"gpu[01-02,07],cpu-a[1-2]-ib"`` ->
    ``["gpu01", "gpu02", "gpu07", "cpu-a1-ib", "cpu-a2-ib"]``.

    Commas inside brackets separate ranges, outside them hosts; a range keeps
    its zero padding (``[08-10]`` -> 08, 09, 10); several bracket groups in
    one name expand as a product, first group slowest.
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        if item:
            hosts += _expand_one(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    if depth != 0:
        raise ValueError(f"a SLURM host list must balance its brackets. Received: {text!r}.")
    return items


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end():]
    names = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"a SLURM host range must be N or N-M. Received: [{match.group(1)}] in {item!r}.")
        width = len(low)
        for n in range(int(low), int(high or low) + 1):
            names.append(f"{head}{n:0{width}d}")
    return [name + rest for name in names for rest in _expand_one(tail)]


def tasks_per_node(text: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` form as a list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"SLURM tasks per node look like '2(x3),1'. Received: {text!r}.")
        out += [int(match.group(1))] * int(match.group(2) or 1)
    return out


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The rendezvous port of a SLURM job step when MASTER_PORT is not set: 20000 + a value
    in [0, 10000) from the job and step ids, so concurrent jobs (and steps of one job) on
    the same first host rarely collide, and it stays below Linux' ephemeral ports (32768+)."""
    return 20000 + (int(job_id) * 10 + int(step_id)) % 10000


def _from_torchrun(env) -> Launch:
    where = "torchrun's environment"
    return Launch(
        "torchrun", _int(env, "RANK", where), _int(env, "WORLD_SIZE", where),
        _int(env, "LOCAL_RANK", where), _int(env, "LOCAL_WORLD_SIZE", where),
        env.get("MASTER_ADDR"), _int(env, "MASTER_PORT", where) if env.get("MASTER_PORT") else None,
        None, _int(env, "GROUP_RANK", where) if "GROUP_RANK" in env else 0,
    )


def _from_slurm(env) -> Launch:
    where = "SLURM's environment"
    rank = _int(env, "SLURM_PROCID", where)
    world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS", where)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    hosts = tuple(expand_hostlist(nodelist)) if nodelist else None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = int(env.get("SLURM_NODEID", "0") or 0)
    counts = tasks_per_node(per_node) if per_node else []
    local_world = counts[node] if node < len(counts) else world
    addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT", where)
    else:
        step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "0"
        port = slurm_port(_int(env, "SLURM_JOB_ID" if "SLURM_JOB_ID" in env else "SLURM_JOBID", where),
                          int(step) if step.isdigit() else 0)
    local = _int(env, "SLURM_LOCALID", where) if "SLURM_LOCALID" in env else 0
    return Launch("slurm", rank, world, local, local_world, addr, port, hosts, node)


def _from_env(env) -> Launch:
    where = "MASTER_ADDR/RANK/WORLD_SIZE"
    world = _int(env, "WORLD_SIZE", where)
    return Launch(
        "env", _int(env, "RANK", where), world,
        _int(env, "LOCAL_RANK", where) if "LOCAL_RANK" in env else 0,
        _int(env, "LOCAL_WORLD_SIZE", where) if "LOCAL_WORLD_SIZE" in env else world,
        env.get("MASTER_ADDR"), _int(env, "MASTER_PORT", where) if env.get("MASTER_PORT") else None,
        None, _int(env, "GROUP_RANK", where) if "GROUP_RANK" in env else 0,
    )


def detect(env: Mapping[str, str] | None = None) -> Launch | None:
    """This process's `Launch`, or None when no launcher started it (one process on its own).

    Inside a rank spawned by `shardimpl.launch` (``SHARDIMPL_LAUNCHED_RANK``) the
    launcher is that parent: "env". Raises ValueError naming a variable that is
    set but not an integer.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and LAUNCHER_CHILD_FLAG not in env:
        return _from_torchrun(env)
    if (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")) and "SLURM_PROCID" in env \
            and LAUNCHER_CHILD_FLAG not in env:
        return _from_slurm(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_env(env)
    return None
