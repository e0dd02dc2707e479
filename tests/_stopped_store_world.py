"""One of two torch-only processes (MASTER_ADDR/RANK/WORLD_SIZE by hand): rank 0, which serves the
rendezvous store, stops itself after the join; rank 1 then waits for it at an agreement point.

Run as ``python _stopped_store_world.py OUT_DIR``; rank 1 writes OUT_DIR/rank1.json with the error
it got and how long it took.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main(out_dir):
    rank = int(os.environ["RANK"])
    import shardimpl
    from shardimpl.agree import agree

    open(os.path.join(out_dir, f"ready{rank}"), "w").close()  # join together (see _slurm_world.py)
    while not all(os.path.exists(os.path.join(out_dir, f"ready{r}")) for r in range(2)):
        time.sleep(0.05)
    shardimpl.initialize(timeout=2)
    import torch.distributed as dist

    dist.barrier()  # both past the join: torch's own store reads there would not time out
    if rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)  # the store's server stops with it
    begin = time.monotonic()
    try:
        agree(None, where="the test's agreement point")
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, "rank1.json"), "w") as f:
        json.dump({"error": error, "seconds": time.monotonic() - begin}, f)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
