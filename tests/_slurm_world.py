"""One task of a SLURM job step simulated by hand (only SLURM_* variables): run as
``python _slurm_world.py OUT_DIR``. Writes OUT_DIR/rank{R}.json.

1. Imports keras and shardimpl in either order (rank 1: shardimpl first), then
   ``keras.distribution.initialize()`` before ``shardimpl.install()``.
2. The world comes from SLURM's variables: rank, size, the first host of the
   compressed node list, the port derived from the job id; before install a
   mesh names install().
3. ``launch.run`` uses the step's tasks (no spawning): the pids are the tasks'.
4. Rank 2 stops itself (SIGSTOP) inside ``fn`` while ranks 0 and 1 wait for it in an
   all-reduce: their rows must name rank 2, after the timeout (SHARDIMPL_TIMEOUT).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def whoami():
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "pid": os.getpid(), "world": dist.get_world_size()}


def stop_rank_2_then_all_reduce():
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 2:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen until the test kills it
    t = torch.ones(4)
    dist.all_reduce(t)
    return float(t.sum())


def _wait_for_every_task(out_dir: str, rank: int, world: int) -> None:
    """Test scaffolding: start the join together, so the small timeout measures the stopped rank
    and not how long each task took to import Keras on a loaded machine."""
    open(os.path.join(out_dir, f"ready{rank}"), "w").close()
    while not all(os.path.exists(os.path.join(out_dir, f"ready{r}")) for r in range(world)):
        time.sleep(0.05)


def main(out_dir):
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    if rank == 1:
        import shardimpl
        import keras
    else:
        import keras
        import shardimpl
    from shardimpl import launch

    out = {"environ_before": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}}
    _wait_for_every_task(out_dir, rank, world)
    keras.distribution.initialize()  # before install: the order a launcher script takes
    out["environ_after"] = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out["devices"] = keras.distribution.list_devices()
    try:
        keras.distribution.DeviceMesh((world,), ["model"], out["devices"]).backend_mesh
        out["before_install_error"] = None
    except AttributeError as exc:
        out["before_install_error"] = str(exc)
    shardimpl.install()
    out["rows"] = [r.as_dict() for r in launch.run(whoami, world)]
    begin = time.monotonic()
    rows = launch.run(stop_rank_2_then_all_reduce, world, timeout=120)
    out["stopped_seconds"] = time.monotonic() - begin
    out["stopped_rows"] = [r.as_dict() for r in rows]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    os._exit(0)  # the failed world's gloo objects may outlive the group: skip their exit-time abort


if __name__ == "__main__":
    main(sys.argv[1])
